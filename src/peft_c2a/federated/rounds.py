"""Trainable state and the rules both engines apply to it: what crosses the wire (the trainable, non-private
tensors), how a state is loaded into a model, which clients a round draws, and which updates a server refuses.

`FederationServer` (`server.py`) applies them for both engines; client nodes use the state helpers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .aggregation import non_finite_tensors
from .arguments import FederatedTrainingArguments

TensorDict = dict[str, torch.Tensor]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of `model` that train, and so cross the wire. Raises `ValueError` if there are none."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not params:
        raise ValueError("The model has no trainable parameters: there is nothing to federate.")
    return params


def trainable_state(model: nn.Module) -> TensorDict:
    """A CPU copy of every trainable tensor of `model` (what a round sends down and gets back)."""
    return {name: param.detach().to("cpu", copy=True) for name, param in trainable_parameters(model).items()}


# Trainable tensors that belong to one client: C2A's per-client embedding table. Each client trains only its own row,
# so averaging it would dilute that row to n_k / sum(n) by the other clients' zero updates; it stays on its client.
PRIVATE_PARAMETER_SUFFIXES = (".client_embedding",)


def private_parameter_names(model: nn.Module) -> frozenset[str]:
    """The trainable parameters of `model` that stay with each client: never sent, never averaged."""
    return frozenset(
        name
        for name, param in model.named_parameters()
        if param.requires_grad and name.endswith(PRIVATE_PARAMETER_SUFFIXES)
    )


def shared_trainable_state(model: nn.Module) -> TensorDict:
    """`trainable_state` without the client-private tensors: what a server holds and sends."""
    private = private_parameter_names(model)
    return {name: tensor for name, tensor in trainable_state(model).items() if name not in private}


def load_trainable_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], keep: frozenset[str] = frozenset()
) -> None:
    """Copy `state` into `model`'s trainable parameters; names and shapes must match exactly.

    Names in `keep` may be missing from `state`: those parameters keep their current values (a server's shared
    state leaves the client-private tensors as they are). Every name and shape is checked before anything is
    copied, so a mismatch raises `ValueError` and leaves the model untouched.
    """
    params = trainable_parameters(model)
    params = {name: param for name, param in params.items() if name in state or name not in keep}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"Trainable state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}.")
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"Shape of {name}: model {tuple(param.shape)}, state {tuple(state[name].shape)}.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def sample_round_clients(
    training_clients: Sequence[str], round_index: int, args: FederatedTrainingArguments
) -> list[str]:
    """The clients that train in round `round_index`: a seeded draw without replacement, in name order.

    Depends only on the sorted client names, the round and `args.effective_client_sampling_seed`, so every process,
    every engine and every resumed run draws the same clients.
    """
    names = sorted(training_clients)
    rng = np.random.default_rng([args.effective_client_sampling_seed, round_index])
    chosen = rng.choice(len(names), size=args.num_sampled_clients(len(names)), replace=False)
    return [names[i] for i in sorted(chosen.tolist())]


def screen_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why `update` must not be averaged in (wrong names, shapes or dtypes; NaN or infinite values), or `None`.

    The server calls this on every update it receives: a buggy or hostile client must not be able to corrupt the
    global state.
    """
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"tensor names differ from the global state: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, tensor in update.items():
        expected = reference[name]
        if tuple(tensor.shape) != tuple(expected.shape) or tensor.dtype != expected.dtype:
            return (
                f"{name} is {tuple(tensor.shape)} {tensor.dtype}, the global state has "
                f"{tuple(expected.shape)} {expected.dtype}"
            )
    bad = non_finite_tensors(update)
    if bad:
        return f"non-finite update in {bad[:3]}"
    return None


# fields of a PEFT config that do not change what is trained (where the base model was loaded from, how it is served)
_VOLATILE_CONFIG_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "label_names")


def adapter_fingerprint(model: nn.Module) -> Optional[dict[str, Any]]:
    """The active PEFT adapter's config as plain JSON (sets sorted), without fields that do not change training;
    `None` for a model that is not a `PeftModel`. A checkpoint must match it to continue a run."""
    configs = getattr(model, "peft_config", None)
    name = getattr(model, "active_adapter", None)
    if not isinstance(configs, Mapping) or name not in configs:
        return None
    config = {key: value for key, value in configs[name].to_dict().items() if key not in _VOLATILE_CONFIG_FIELDS}
    return json.loads(json.dumps(config, sort_keys=True, default=_json_value))


def _json_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "value"):  # enums (PeftType, TaskType)
        return value.value
    return str(value)
