"""A causal-LM federation reports next-token accuracy: logits at position t are scored against token t + 1; what a
client's scores count is known from its data alone."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import default_data_collator

import peft_c2a
from peft_c2a.federated import FederatedTrainer

from ..federated_utils import fed_args, skewed_clients, tiny_model
from ..tuner.test_generation import tiny_gpt2


def token_streams(seed: int, count: int = 6, length: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (count, length), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * count, "labels": ids.tolist()}
    )


def test_next_token_accuracy_is_shifted(tmp_path):
    model = get_peft_model(tiny_gpt2(), peft_c2a.BottleneckAdapterConfig(task_type="CAUSAL_LM", bottleneck_dim=4))
    clients = {"a": token_streams(0), "b": token_streams(1)}
    trainer = FederatedTrainer(
        model, fed_args(tmp_path), clients, {"a": token_streams(2)}, data_collator=default_data_collator
    )
    scores = trainer.evaluate_client("a")
    data = token_streams(2)
    ids = torch.tensor(data["input_ids"])
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=torch.tensor(data["attention_mask"])).logits.argmax(-1)
    expected = (predicted[:, :-1] == ids[:, 1:]).float().mean().item()
    unshifted = (predicted == ids).float().mean().item()
    assert abs(scores["accuracy"] - expected) < 1e-9
    assert expected != unshifted


def test_the_scored_example_count_is_known_from_the_data_alone(tmp_path):
    # a Flower node announces this count at query, before any model state exists; its scores must then count exactly
    # as many predictions: the labelled positions after the next-token shift
    model = get_peft_model(tiny_gpt2(), peft_c2a.BottleneckAdapterConfig(task_type="CAUSAL_LM", bottleneck_dim=4))
    masked = token_streams(2).to_dict()
    masked["labels"] = [row[:5] + [-100] * 3 if index % 2 else row for index, row in enumerate(masked["labels"])]
    trainer = FederatedTrainer(
        model,
        fed_args(tmp_path),
        {"a": token_streams(0)},
        {"a": Dataset.from_dict(masked)},
        data_collator=default_data_collator,
    )
    assert trainer.count_scored_examples("a") == 3 * 7 + 3 * 4 == trainer.evaluate_client("a")["num_examples"]


@pytest.mark.parametrize("personalization_steps", [0, 2])
def test_a_classifiers_scored_count_is_its_labelled_test_examples_in_both_passes(tmp_path, personalization_steps):
    train, test = skewed_clients(2)
    masked = test["client-0"].to_dict()
    masked["labels"] = [-100 if index % 3 == 0 else label for index, label in enumerate(masked["labels"])]
    test["client-0"] = Dataset.from_dict(masked)
    trainer = FederatedTrainer(
        tiny_model("c2a"),
        fed_args(tmp_path, personalization_steps=personalization_steps),
        train,
        test,
        data_collator=default_data_collator,
    )
    announced = trainer.count_scored_examples("client-0")
    own = trainer.evaluate_client("client-0")["num_examples"]
    uniform = trainer.evaluate_client("client-0", own_descriptor=False)["num_examples"]
    assert announced == own == uniform == len(masked["labels"]) - 4
