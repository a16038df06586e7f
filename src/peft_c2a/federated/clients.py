"""Clients of a federation: input validation, locally computed descriptors, and the collator that attaches them.

A client is a name and a `datasets.Dataset` (already tokenised, with a label column). Its *descriptor* (what C2A's
hypernetwork is conditioned on) is computed here from the client's own training labels only, the way a real client
would compute it on its device: the label distribution, plus a client id when the adapter has a per-client
embedding. Nothing in here needs the server or other clients.

Validation happens once, before any training: an empty client, labels outside `[0, num_labels)`, or a
`label_distribution` column of the wrong width would otherwise fail in the middle of a round (or silently train on
nonsense), so they raise a `ValueError` that names the client.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..config import C2A_PEFT_TYPE

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("labels", "label", "label_ids")
DESCRIPTOR_COLUMNS = ("label_distribution", "client_ids")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DescriptorSpec:
    """What a C2A adapter's hypernetwork expects as a client descriptor.

    Args:
        num_labels: width of `label_distribution` (`None`: the adapter has no label term).
        num_clients: size of the client-id embedding (`None`: the adapter takes no `client_ids`).
    """

    num_labels: Optional[int]
    num_clients: Optional[int]


@dataclass
class ClientData:
    """One client as the trainer holds it.

    Args:
        name: the client's name (a key of `client_datasets`).
        dataset: its training examples.
        eval_dataset: its own test examples, for personalised evaluation (`None`: not evaluated).
        label_counts: how many training examples carry each label (`None` when labels are not class ids).
        descriptor: its label distribution as float probabilities of shape `(num_labels,)` (C2A only).
        client_id: its index in the client-id embedding (C2A with `num_clients` only).
    """

    name: str
    dataset: Any
    eval_dataset: Any = None
    label_counts: Optional[np.ndarray] = None
    descriptor: Optional[torch.Tensor] = None
    client_id: Optional[int] = None

    @property
    def num_examples(self) -> int:
        """Number of training examples (the client's FedAvg weight)."""
        return len(self.dataset)


def descriptor_spec(model: nn.Module) -> Optional[DescriptorSpec]:
    """The descriptor that `model`'s active C2A adapter expects, or `None` if the model is not a C2A model."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        return None
    active = getattr(model, "active_adapter", None)
    config = peft_config.get(active) if isinstance(active, str) else None
    if config is None or getattr(config, "peft_type", None) != C2A_PEFT_TYPE:
        return None
    return DescriptorSpec(num_labels=config.num_labels, num_clients=config.num_clients)


def expected_num_labels(model: nn.Module, spec: Optional[DescriptorSpec]) -> Optional[int]:
    """The number of classes labels must fall in, when known: C2A's `num_labels`, else a classifier's."""
    if spec is not None and spec.num_labels is not None:
        return spec.num_labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return getattr(base.config, "num_labels", None)
    return None


def label_column(dataset: Any) -> Optional[str]:
    """The dataset's label column (`labels`, `label` or `label_ids`), or `None` if it has none."""
    columns = getattr(dataset, "column_names", None) or []
    return next((name for name in LABEL_COLUMNS if name in columns), None)


def flat_labels(dataset: Any, column: str) -> np.ndarray:
    """All class labels of a dataset as a flat int64 array (token-level label lists are flattened; -100 dropped)."""
    values = list(dataset[column])
    if values and isinstance(values[0], (list, tuple, np.ndarray)):
        values = [label for row in values for label in row]
    labels = np.asarray(values)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Column {column!r} must hold integer class ids, got dtype {labels.dtype}.")
    labels = labels.astype(np.int64).reshape(-1)
    return labels[labels != IGNORE_INDEX]


def build_clients(
    client_datasets: Mapping[str, Any],
    client_eval_datasets: Optional[Mapping[str, Any]],
    spec: Optional[DescriptorSpec],
    num_labels: Optional[int],
) -> dict[str, ClientData]:
    """Validate every client's data and compute its descriptor locally. Raises `ValueError` naming the bad client."""
    if not client_datasets:
        raise ValueError("`client_datasets` is empty: a federation needs at least one client.")
    eval_sets = dict(client_eval_datasets or {})
    unknown = sorted(set(eval_sets) - set(client_datasets))
    if unknown:
        raise ValueError(f"`client_eval_datasets` names clients that have no training data: {unknown}.")
    names = sorted(client_datasets)
    if spec is not None and spec.num_clients is not None and len(names) > spec.num_clients:
        raise ValueError(
            f"The C2A adapter embeds {spec.num_clients} client ids (`num_clients`), but there are {len(names)} clients."
        )
    clients = {}
    for index, name in enumerate(names):
        dataset = client_datasets[name]
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"Client {name!r} has no training examples; drop it or give it data.")
        client = ClientData(name=name, dataset=dataset, eval_dataset=eval_sets.get(name))
        if client.eval_dataset is not None and len(client.eval_dataset) == 0:
            raise ValueError(f"Client {name!r} has an empty evaluation dataset; pass None to skip its evaluation.")
        for split, data in (("training", dataset), ("evaluation", client.eval_dataset)):
            if data is not None:
                _check_descriptor_columns(name, split, data, spec)
                if num_labels is not None and label_column(data) is None:
                    # a classifier computes its loss and scores from labels: without them the client would fail
                    # (training) or be scored on nothing (evaluation) every round
                    raise ValueError(
                        f"Client {name!r}: its {split} data has no label column ({' / '.join(LABEL_COLUMNS)}), which "
                        f"a classifier with {num_labels} labels needs."
                    )
                counts = _label_counts(name, split, data, num_labels)
                if split == "training":
                    client.label_counts = counts
        if spec is not None and spec.num_labels is not None:
            if client.label_counts is None:
                raise ValueError(
                    f"Client {name!r}: a C2A adapter with `num_labels={spec.num_labels}` needs a label column "
                    f"({' / '.join(LABEL_COLUMNS)}) to compute the client's label distribution."
                )
            client.descriptor = torch.as_tensor(client.label_counts / client.label_counts.sum(), dtype=torch.float32)
        if spec is not None and spec.num_clients is not None:
            client.client_id = index
        if client.label_counts is not None and np.count_nonzero(client.label_counts) == 1:
            logger.warning(
                "Client %r holds a single class (%d); its updates will be strongly skewed.",
                name,
                int(np.argmax(client.label_counts)),
            )
        clients[name] = client
    return clients


def _label_counts(name: str, split: str, dataset: Any, num_labels: Optional[int]) -> Optional[np.ndarray]:
    column = label_column(dataset)
    if column is None or num_labels is None:
        return None
    labels = flat_labels(dataset, column)
    if labels.size == 0:
        raise ValueError(f"Client {name!r}: its {split} data has no labelled examples (all labels are -100).")
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.size:
        raise ValueError(
            f"Client {name!r}: {split} labels must lie in [0, {num_labels}) to match the model's `num_labels`, "
            f"found {sorted(set(bad.tolist()))[:5]}."
        )
    return np.bincount(labels, minlength=num_labels).astype(np.int64)


def _check_descriptor_columns(name: str, split: str, dataset: Any, spec: Optional[DescriptorSpec]) -> None:
    columns = getattr(dataset, "column_names", None) or []
    if "label_distribution" in columns:
        width = None if spec is None else spec.num_labels
        if width is None:
            raise ValueError(
                f"Client {name!r}: its {split} data has a `label_distribution` column, but the model is not a C2A "
                "model with a label term; drop the column."
            )
        # every row, once, here: a bad row found during training would drop the client every round instead
        for row_index, row in enumerate(dataset["label_distribution"]):
            values = np.asarray(row, dtype=object)
            if values.shape != (width,):
                raise ValueError(
                    f"Client {name!r}: `label_distribution` rows must have {width} entries to match the C2A adapter's "
                    f"`num_labels`, got shape {values.shape} in {split} row {row_index}."
                )
            try:
                numbers = values.astype(np.float64)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Client {name!r}: {split} row {row_index} of `label_distribution`: {error}"
                ) from error
            if not np.isfinite(numbers).all() or (numbers < 0).any() or numbers.sum() <= 0:
                raise ValueError(
                    f"Client {name!r}: {split} row {row_index} of `label_distribution` must hold finite, non-negative "
                    f"counts or probabilities with a positive sum, got {numbers.tolist()}."
                )


class DescriptorCollator:
    """Wraps a data collator and adds a client's descriptor to every batch it builds.

    The descriptor travels as model keyword arguments (`label_distribution=`, `client_ids=`), which the C2A tuner
    consumes before the base model's forward. Batches whose examples already carry a `label_distribution` column
    (e.g. the pooled data of the centralised baseline) keep their own.

    Args:
        collator: the data collator to wrap.
        label_distribution: the client's label distribution (`(num_labels,)`), or `None`.
        client_id: the client's id, or `None`.
    """

    def __init__(
        self,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        label_distribution: Optional[torch.Tensor] = None,
        client_id: Optional[int] = None,
    ) -> None:
        self.collator = collator
        self.label_distribution = label_distribution
        self.client_id = client_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(list(features))
        size = len(features)
        if self.label_distribution is not None and "label_distribution" not in batch:
            batch["label_distribution"] = self.label_distribution.expand(size, -1).clone()
        if self.client_id is not None and "client_ids" not in batch:
            batch["client_ids"] = torch.full((size,), self.client_id, dtype=torch.long)
        return batch


def data_fingerprint(client: ClientData) -> dict[str, Any]:
    """What identifies a client's training data for a resume: its size, label counts and a SHA-256 of its content
    (every column, in order). A resumed run whose client holds other data under the same name must not continue."""
    digest = hashlib.sha256()
    for batch in client.dataset.iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, default=_as_json).encode())
    return {
        "examples": client.num_examples,
        "label_counts": None if client.label_counts is None else [int(count) for count in client.label_counts],
        "sha256": digest.hexdigest(),
    }


def _as_json(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
