"""Tiny, fast federations for the federated-trainer tests: random tiny BERT, learnable synthetic token data.

The data is learnable on purpose (the first token encodes the label), so tests can assert that learning happens.
Everything is seeded; building the same thing twice gives identical tensors.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertForSequenceClassification, default_data_collator

import peft_c2a
from peft_c2a.federated import FederatedTrainer, FederatedTrainingArguments

from .conftest import NUM_LABELS, tiny_bert_config

SEQ_LEN = 8


def token_dataset(num_examples: int, seed: int, label_pool: list[int], label_key: str = "labels") -> Dataset:
    """`num_examples` sequences whose labels are drawn from `label_pool`; token 0 is `label + 1` (learnable)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(label_pool, size=num_examples)
    ids = rng.integers(4, 100, size=(num_examples, SEQ_LEN))
    ids[:, 0] = labels + 1
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), label_key: labels.tolist()}
    )


def skewed_clients(num_clients: int = 4, size: int = 24, eval_size: int = 12, seed: int = 0):
    """Clients holding two of the three labels each (label skew), with own test sets of the same mix."""
    train, test = {}, {}
    for i in range(num_clients):
        pool = [i % NUM_LABELS, (i + 1) % NUM_LABELS]
        train[f"client-{i}"] = token_dataset(size, seed * 1000 + i, pool)
        test[f"client-{i}"] = token_dataset(eval_size, seed * 1000 + 500 + i, pool)
    return train, test


def tiny_model(method: str = "c2a", seed: int = 0, **config_overrides: Any) -> torch.nn.Module:
    """A tiny random BERT classifier wrapped with `method` (c2a, bottleneck, lora, ia3, prefix)."""
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config())
    if method == "c2a":
        config = peft_c2a.C2AConfig(
            task_type="SEQ_CLS", num_labels=NUM_LABELS, bottleneck_dim=4, init_seed=seed, **config_overrides
        )
    elif method == "bottleneck":
        config = peft_c2a.BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=4, **config_overrides)
    elif method == "lora":
        from peft import LoraConfig

        config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], **config_overrides)
    elif method == "ia3":
        from peft import IA3Config

        config = IA3Config(
            task_type="SEQ_CLS",
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            **config_overrides,
        )
    elif method == "prefix":
        from peft import PrefixTuningConfig

        config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, **config_overrides)
    else:
        raise ValueError(method)
    return get_peft_model(base, config)


def fed_args(output_dir: os.PathLike | str, **overrides: Any) -> FederatedTrainingArguments:
    """Small, fast, quiet federated arguments on CPU."""
    values = dict(
        output_dir=str(output_dir),
        num_rounds=2,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        save_every_rounds=0,
        seed=0,
    )
    values.update(overrides)
    return FederatedTrainingArguments(**values)


def make_trainer(tmp_path, method: str = "c2a", clients=None, eval_clients=None, model=None, **arg_overrides: Any):
    """A `FederatedTrainer` over `skewed_clients()` unless clients are given."""
    if clients is None:
        clients, default_eval = skewed_clients()
        eval_clients = default_eval if eval_clients is None else eval_clients
    return FederatedTrainer(
        model if model is not None else tiny_model(method),
        fed_args(tmp_path, **arg_overrides),
        clients,
        eval_clients,
        data_collator=default_data_collator,
    )
