"""Callback states in a federation checkpoint: what `Trainer` keeps in `trainer_state.json` as `stateful_callbacks`.

A callback that implements `transformers.ExportableState` (`EarlyStoppingCallback` and its patience counter, say)
has its `state()` written into every round checkpoint, and a resumed run restores it when
`restore_callback_states_from_checkpoint=True`, as the `Trainer` does; with the default `False` a resumed run counts
afresh, also as the `Trainer` does.

One difference from the `Trainer`: only the stored *attributes* (the counters) are restored, onto the callbacks the
resumed trainer already holds. Their constructor arguments stay as the resumed run gives them, so a run resumed with
a longer patience keeps its counter and uses the new patience, instead of silently getting the old one back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)


def export_callback_states(callbacks: Iterable[Any]) -> dict[str, list[dict[str, Any] | None]]:
    """`{class name: [state(), ...]}` of the `ExportableState` callbacks, in their order (a class may occur twice).

    A state that JSON cannot hold (a tensor, a path) is stored as `None` with a warning rather than failing the
    checkpoint it would be written into; that callback then counts afresh after a resume. The placeholder keeps the
    positions: the next callback of the same class still gets its own state back, not its predecessor's slot."""
    states: dict[str, list[dict[str, Any] | None]] = {}
    for callback in callbacks:
        if isinstance(callback, ExportableState):
            state = callback.state()
            try:
                json.dumps(state, allow_nan=False)
            except (TypeError, ValueError) as error:
                logger.warning("Not checkpointing the state of %s: %s.", type(callback).__name__, error)
                state = None
            states.setdefault(type(callback).__name__, []).append(state)
    return states


def restore_callback_states(callbacks: Sequence[Any], stored: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> None:
    """Set the stored attributes on the matching callbacks: the k-th stored state of a class goes to the k-th
    `ExportableState` callback of that class (a `None` state, one JSON could not hold, leaves its callback fresh).
    Stored states without a callback are reported and left out."""
    left_out = []
    for name, states in stored.items():
        holders = [cb for cb in callbacks if isinstance(cb, ExportableState) and type(cb).__name__ == name]
        if len(holders) < len(states):
            left_out.append(f"{name} ({len(states) - len(holders)} of {len(states)})")
        # a callback added since the checkpoint (more holders than states) keeps its fresh state
        for callback, state in zip(holders, states, strict=False):
            for attribute, value in (state or {}).get("attributes", {}).items():
                setattr(callback, attribute, value)
    if left_out:
        logger.warning("The checkpoint holds states of callbacks this trainer does not have: %s.", ", ".join(left_out))
