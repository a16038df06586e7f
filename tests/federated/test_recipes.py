"""`peft_c2a.recipes`: the model and federation recipes the example, the Flower app and the benchmarks share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertForSequenceClassification

from peft_c2a import C2AConfig
from peft_c2a.federated import dirichlet_label_partition, label_counts, partition_like
from peft_c2a.recipes import (
    AdapterArguments,
    apply_adapter,
    split_into_clients,
    tokenize_for_classification,
)

from ..conftest import NUM_LABELS, tiny_bert_config


def fresh_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_every_method_trains_what_it_should():
    names = {
        method: trainable(apply_adapter(fresh_bert(), AdapterArguments(method), NUM_LABELS, seed=0))
        for method in ("c2a", "bottleneck", "lora", "head")
    }
    assert names["head"] == {"classifier.weight", "classifier.bias"}
    assert any("c2a_hypernet" in name for name in names["c2a"])
    assert any("lora_A" in name for name in names["lora"]) and not any("c2a" in name for name in names["lora"])
    assert any("bottleneck_down" in name for name in names["bottleneck"])
    for method in ("c2a", "bottleneck", "lora"):  # the new classifier head trains with every adapter
        assert any("classifier" in name for name in names[method]), method


def test_c2a_settings_reach_the_config_and_seed_the_adapters():
    adapter = AdapterArguments(
        "c2a", bottleneck_dim=4, c2a_use_context=False, c2a_logit_adjustment=0.5, c2a_client_embeddings=True
    )
    model = apply_adapter(fresh_bert(), adapter, NUM_LABELS, seed=3, num_clients=5)
    config = model.peft_config["default"]
    assert isinstance(config, C2AConfig)
    assert (config.bottleneck_dim, config.use_context, config.logit_adjustment) == (4, False, 0.5)
    assert (config.num_clients, config.init_seed, config.num_labels) == (5, 3, NUM_LABELS)
    again = apply_adapter(fresh_bert(), adapter, NUM_LABELS, seed=3, num_clients=5)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bad_adapter_settings_raise():
    with pytest.raises(ValueError, match="peft_method"):
        AdapterArguments("prefix")
    with pytest.raises(ValueError, match="number of clients"):
        apply_adapter(fresh_bert(), AdapterArguments("c2a", c2a_client_embeddings=True), NUM_LABELS, seed=0)


def test_split_without_groups_is_the_dirichlet_split_with_matching_test_splits():
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
    split = split_into_clients(train, test, 4, num_clients=6, alpha=0.3, min_client_size=5, seed=2)
    parts = dirichlet_label_partition(train, 6, 0.3, 5, 2, 4)
    assert split.names == [f"client-{i:02d}" for i in range(6)] and split.groups is None
    assert all(np.array_equal(a, b) for a, b in zip(split.parts, parts, strict=True))
    np.testing.assert_array_equal(split.counts, label_counts(parts, train, 4))
    expected = partition_like(test, split.counts, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(split.test_parts, expected, strict=True))


def test_split_by_group_keeps_each_client_and_its_test_split_inside_its_group():
    rng = np.random.default_rng(1)
    train_groups = ["de", "en", "fr"] * 100
    test_groups = ["de", "en", "fr"] * 40
    train, test = rng.integers(0, 3, 300), rng.integers(0, 3, 120)
    split = split_into_clients(
        train,
        test,
        3,
        num_clients=6,
        alpha=1.0,
        min_client_size=4,
        seed=0,
        train_groups=train_groups,
        test_groups=test_groups,
    )
    assert len(split.names) == 6 and sorted(set(split.groups)) == ["de", "en", "fr"]
    for group, part, test_part in zip(split.groups, split.parts, split.test_parts, strict=True):
        assert {train_groups[i] for i in part} == {group}
        assert {test_groups[i] for i in test_part} <= {group}
    with pytest.raises(ValueError, match="test_groups"):
        split_into_clients(train, test, 3, 6, 1.0, 4, 0, train_groups=train_groups)


def test_tokenize_for_classification_keeps_inputs_and_labels_only():
    class Whitespace:
        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[len(word) for word in text.split()][:max_length] for text in texts]}

    data = DatasetDict({"train": Dataset.from_dict({"body": ["a bb ccc", "dddd"], "topic": [1, 0], "id": [7, 8]})})
    encoded = tokenize_for_classification(data, Whitespace(), "body", "topic", max_length=2, prefix="x ")
    assert encoded["train"].column_names == ["input_ids", "labels"]
    assert encoded["train"]["input_ids"] == [[1, 1], [1, 4]] and encoded["train"]["labels"] == [1, 0]


def test_split_into_clients_can_draw_a_fixed_number_of_test_examples_per_client():
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 4, size=400), rng.integers(0, 4, size=200)
    split = split_into_clients(train, test, 4, num_clients=8, alpha=0.1, min_client_size=5, seed=0,
                               test_examples_per_client=20)  # fmt: skip
    for part, counts in zip(split.test_parts, split.counts, strict=True):
        held = set(np.flatnonzero(counts).tolist())
        assert set(test[part].tolist()) <= held  # only the client's own labels
        assert len(part) == min(20, sum(int((test == label).sum()) for label in held))
    groups = np.array(["en", "de"] * 200)
    test_groups = np.array(["en", "de"] * 100)
    grouped = split_into_clients(train, test, 4, num_clients=4, alpha=0.5, min_client_size=5, seed=0,
                                 train_groups=groups, test_groups=test_groups, test_examples_per_client=15)  # fmt: skip
    for part, group in zip(grouped.test_parts, grouped.groups, strict=True):
        assert len(part) <= 15 and set(test_groups[part].tolist()) <= {group}
    assert max(len(part) for part in grouped.test_parts) == 15
