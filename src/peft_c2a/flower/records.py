"""How trainable states and round settings travel in Flower messages.

Keys of a message's `RecordDict`: `STATE_KEY` holds an `ArrayRecord` (the global state going down, an update coming
back), `CONFIG_KEY` a `ConfigRecord` of settings (in train replies: the client, its status and error),
`METRICS_KEY` a `MetricRecord`. Query replies describe a node's clients under `CLIENTS_KEY`; evaluation replies hold
one `MetricRecord` per client and descriptor under `"{own|uniform}/{client}"`, and clients whose evaluation failed
under `ERRORS_KEY`. Client-private tensors never travel (the node keeps them, `client_app.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

STATE_KEY = "arrays"  # the name Flower's own strategies use, so its tooling recognises it
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
CLIENTS_KEY = "clients"
ERRORS_KEY = "errors"
OWN_PREFIX = "own/"
UNIFORM_PREFIX = "uniform/"

TensorDict = dict[str, torch.Tensor]


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An `ArrayRecord` of `state` (CPU copies; names and order kept)."""
    return ArrayRecord({name: tensor.detach().cpu() for name, tensor in state.items()})


def state_from_record(record: ArrayRecord) -> TensorDict:
    """The tensors of `record` as writable torch tensors (Flower hands out read-only numpy-backed ones)."""
    return {name: tensor.clone() for name, tensor in record.to_torch_state_dict().items()}
