"""Recipes the example, the Flower app and the benchmarks share, written once: a PEFT method by name on a sequence
classifier, and a labelled dataset split into a federation of non-IID clients.

- `AdapterArguments` + `apply_adapter` / `build_classifier`: "c2a", "bottleneck", "lora" or "head" (a frozen
  backbone with a trainable classifier) on a `AutoModelForSequenceClassification`, seeded so that a run, and every
  Flower node, starts from the same weights. `AdapterArguments` is an `HfArgumentParser` dataclass: the example's
  flags are its fields.
- `split_into_clients`: Dirichlet label skew over clients, or clients of one group each (e.g. a language) with
  Dirichlet labels inside it, and each client's personal test split, which follows its training label mix (drawn
  from its own group).
- `choose_unseen_clients`: the seeded clients held out of training (round-robin over groups when there are groups).
- `tokenize_for_classification`: text and label columns to model inputs with `labels`.

This module sits on top of the tuner and `peft_c2a.federated`; nothing in the library imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from torch import nn

from .federated.client_splits import grouped_partition_like, label_counts, partition_like, sample_like
from .federated.partitioning import dirichlet_label_partition, group_dirichlet_partition

PEFT_METHODS = ("c2a", "bottleneck", "lora", "head")


@dataclass
class AdapterArguments:
    """Which PEFT method to federate, and its settings."""

    peft_method: str = field(default="c2a", metadata={"help": "Adapter to federate.", "choices": list(PEFT_METHODS)})
    bottleneck_dim: int = field(default=16, metadata={"help": "Bottleneck size r of C2A / bottleneck adapters."})
    c2a_use_context: bool = field(default=True, metadata={"help": "C2A: condition adapters on each input (context)."})
    c2a_use_label_term: bool = field(
        default=True, metadata={"help": "C2A: condition adapters on the client's label distribution (label term)."}
    )
    c2a_logit_adjustment: float = field(
        default=1.0, metadata={"help": "C2A: weight of log(label prior) added to the logits; 0 turns it off."}
    )
    c2a_client_embed_dim: int = field(default=8, metadata={"help": "C2A: client embedding size k."})
    c2a_hyper_latent_dim: int = field(default=32, metadata={"help": "C2A: hypernetwork factorisation width m."})
    c2a_client_embeddings: bool = field(
        default=False, metadata={"help": "C2A: a learned embedding per client (kept on the client, never averaged)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (query/value; alpha = 2 r)."})
    c2a_adapter_kind: str = field(
        default="bottleneck",
        metadata={
            "help": "C2A: generate bottleneck adapters, or LoRA factors of rank lora_r on LoRA's targets (alpha 2 r, "
            "as the LoRA baseline; exportable and mergeable with c2a_use_context=False).",
            "choices": ["bottleneck", "lora"],
        },
    )

    def __post_init__(self) -> None:
        if self.peft_method not in PEFT_METHODS:
            raise ValueError(f"peft_method must be one of {PEFT_METHODS}, got {self.peft_method!r}.")


def apply_adapter(
    base: nn.Module, adapter: AdapterArguments, num_labels: int, seed: int, num_clients: Optional[int] = None
) -> nn.Module:
    """`base` (a sequence classifier) with `adapter.peft_method`; the adapters are initialised from `seed`.

    `num_clients` sizes C2A's per-client embedding when `adapter.c2a_client_embeddings` is set.
    """
    from peft import LoraConfig, get_peft_model

    from .config import BottleneckAdapterConfig, C2AConfig

    if adapter.peft_method == "head":
        head = getattr(base, "classifier", None)
        if head is None:
            raise ValueError("peft_method 'head' needs a model with a `classifier` module.")
        for param in base.parameters():
            param.requires_grad = False
        for param in head.parameters():
            param.requires_grad = True
        return base
    if adapter.peft_method == "c2a":
        if adapter.c2a_client_embeddings and not num_clients:
            raise ValueError("C2A client embeddings (c2a_client_embeddings) need the number of clients.")
        # C2A-LoRA takes the LoRA baseline's shape (rank lora_r, alpha 2 r); the bottleneck kind its own r
        lora = adapter.c2a_adapter_kind == "lora"
        config = C2AConfig(
            task_type="SEQ_CLS",
            num_labels=num_labels,
            bottleneck_dim=adapter.lora_r if lora else adapter.bottleneck_dim,
            client_embed_dim=adapter.c2a_client_embed_dim,
            hyper_latent_dim=adapter.c2a_hyper_latent_dim,
            use_context=adapter.c2a_use_context,
            use_label_term=adapter.c2a_use_label_term,
            logit_adjustment=adapter.c2a_logit_adjustment,
            num_clients=num_clients if adapter.c2a_client_embeddings else None,
            init_seed=seed,
            adapter_kind=adapter.c2a_adapter_kind,
            **({"lora_alpha": 2.0 * adapter.lora_r} if lora else {}),
        )
    elif adapter.peft_method == "bottleneck":
        config = BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=adapter.bottleneck_dim)
    else:
        config = LoraConfig(task_type="SEQ_CLS", r=adapter.lora_r, lora_alpha=2 * adapter.lora_r)
    return get_peft_model(base, config)


def build_classifier(
    model_name_or_path: str,
    adapter: AdapterArguments,
    num_labels: int,
    seed: int,
    num_clients: Optional[int] = None,
    label_names: Optional[Sequence[str]] = None,
) -> nn.Module:
    """`AutoModelForSequenceClassification.from_pretrained(model_name_or_path)` with `adapter.peft_method`.

    Seeded: the new classification head and the adapters are initialised from `seed`, so a run is reproducible and
    every Flower node builds the same model as the server. `label_names` become the config's `id2label` /
    `label2id`, so pipelines show class names.
    """
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    names = {}
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels.")
        names = {
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: index for index, name in enumerate(label_names)},
        }
    base = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=num_labels, **names)
    return apply_adapter(base, adapter, num_labels, seed, num_clients)


@dataclass
class ClientSplit:
    """A federation's clients over a dataset: one training and one personal test index array per client."""

    names: list[str]
    parts: list[np.ndarray]
    test_parts: list[np.ndarray]
    counts: np.ndarray  # (num_clients, num_labels) training label counts
    groups: Optional[list[str]] = None  # each client's group, when the split is by group


def split_into_clients(
    train_labels: Sequence[int],
    test_labels: Sequence[int],
    num_labels: int,
    num_clients: int,
    alpha: float,
    min_client_size: int,
    seed: int,
    train_groups: Optional[Sequence[Any]] = None,
    test_groups: Optional[Sequence[Any]] = None,
    clients_per_group: Optional[int] = None,
    test_examples_per_client: Optional[int] = None,
) -> ClientSplit:
    """Clients of a training split and their personal test splits.

    Without groups: Dirichlet(`alpha`) label skew over `num_clients` clients named `client-00`, `client-01`, ...
    With `train_groups` (one per example, e.g. its language): `clients_per_group` clients per group (default
    `num_clients // number of groups`), Dirichlet labels inside each group; `test_groups` then keeps every client's
    test split inside its own group. Each client's test split follows its training label mix: a share of the test
    split proportional to the client's training share (`partition_like`), or with `test_examples_per_client` that
    many examples drawn for each client from the (group's) test split (`sample_like`; clients may share some).
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    if train_groups is None:
        parts = dirichlet_label_partition(train_labels, num_clients, alpha, min_client_size, seed, num_labels)
        names = [f"client-{i:02d}" for i in range(len(parts))]
        counts = label_counts(parts, train_labels, num_labels)
        if test_examples_per_client:
            return ClientSplit(names, parts, sample_like(test_labels, counts, test_examples_per_client, seed), counts)
        return ClientSplit(names, parts, partition_like(test_labels, counts, seed=seed), counts)
    if test_groups is None:
        raise ValueError("A split by group needs the group of every test example (`test_groups`).")
    train_groups = [str(group) for group in train_groups]
    per_group = clients_per_group or max(1, num_clients // len(set(train_groups)))
    parts, names = group_dirichlet_partition(
        train_labels, train_groups, per_group, alpha, min_client_size, seed, num_labels
    )
    counts = label_counts(parts, train_labels, num_labels)
    client_groups = [train_groups[int(part[0])] for part in parts]
    test_groups = [str(g) for g in test_groups]
    if test_examples_per_client:
        test_parts = [np.empty(0, dtype=np.int64)] * len(parts)
        for group in sorted(set(client_groups)):
            members = np.flatnonzero(np.asarray(test_groups) == group)
            mine = [i for i, g in enumerate(client_groups) if g == group]
            drawn = sample_like(test_labels[members], counts[mine], test_examples_per_client, seed)
            for client, part in zip(mine, drawn, strict=True):
                test_parts[client] = members[part]
    else:
        test_parts = grouped_partition_like(test_labels, test_groups, counts, client_groups, seed)
    return ClientSplit(names, parts, test_parts, counts, client_groups)


def choose_unseen_clients(
    names: Sequence[str], fraction: float, seed: int, groups: Optional[Sequence[str]] = None
) -> list[str]:
    """The `round(fraction * len(names))` clients held out of training, seeded (sorted).

    With `groups` (one per client, e.g. its language), clients are taken round-robin over the groups in a seeded
    order, so no group loses all its clients before every group has lost one. Raises `ValueError` when every client
    would be held out.
    """
    count = int(round(fraction * len(names)))
    if count <= 0:
        return []
    if count >= len(names):
        raise ValueError(f"An unseen fraction of {fraction} would hold out all {len(names)} clients.")
    rng = np.random.default_rng(seed)
    if groups is None:
        return sorted(rng.choice(list(names), size=count, replace=False).tolist())
    by_group: dict[str, list[str]] = {}
    for name, group in zip(names, groups, strict=True):
        by_group.setdefault(str(group), []).append(name)
    order = sorted(by_group)
    order = [order[i] for i in rng.permutation(len(order))]
    queues = {g: [by_group[g][i] for i in rng.permutation(len(by_group[g]))] for g in order}
    chosen: list[str] = []
    while len(chosen) < count:
        for group in order:
            if queues[group] and len(chosen) < count:
                chosen.append(queues[group].pop(0))
    return sorted(chosen)


def tokenize_for_classification(
    data: Any, tokenizer: Any, text_column: str, label_column: str, max_length: int, prefix: str = ""
) -> Any:
    """`data` (a `datasets.Dataset` or `DatasetDict`) as model inputs with a `labels` column, every other column
    dropped; `prefix` is put before every text (e5 models take "query: ")."""

    def tokenize(batch: dict) -> dict:
        texts = [prefix + text for text in batch[text_column]] if prefix else batch[text_column]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    columns = data["train"].column_names if hasattr(data, "keys") else data.column_names
    return data.map(tokenize, batched=True, remove_columns=columns)
