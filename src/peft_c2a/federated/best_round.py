"""The best round of a federation by `metric_for_best_model`: what `load_best_model_at_end`, the Trainer's
`state.best_metric` and checkpoint pruning use.

It is computed from the history, not carried as extra state: a resumed run finds the same best round, and the
history is the one record both engines keep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional


def metric_key(metric_for_best_model: str) -> str:
    """The history key of `metric_for_best_model` (`"personalized_mean_accuracy"` ->
    `"eval_personalized_mean_accuracy"`), as `Trainer` prefixes it."""
    return metric_for_best_model if metric_for_best_model.startswith("eval_") else f"eval_{metric_for_best_model}"


def check_metric_present(record: Mapping[str, Any], metric_for_best_model: str) -> None:
    """Raise `KeyError` naming the available evaluation scores if an evaluation `record` lacks the metric."""
    key = metric_key(metric_for_best_model)
    if key not in record:
        available = sorted(k for k, v in record.items() if k.startswith("eval_") and isinstance(v, (int, float)))
        raise KeyError(
            f"`metric_for_best_model` is {metric_for_best_model!r}, but the federation's evaluation has no {key!r}. "
            f"Available: {available}."
        )


def best_evaluation(
    history: Sequence[Mapping[str, Any]], metric_for_best_model: str, greater_is_better: bool
) -> Optional[tuple[int, float]]:
    """`(round, value)` of the evaluation that scored best (the first of equal ones, as the Trainer keeps a best
    only when strictly beaten); `None` before any evaluation. Non-finite scores never win."""
    key = metric_key(metric_for_best_model)
    best: Optional[tuple[int, float]] = None
    for record in history:
        value = record.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if best is None or (value > best[1] if greater_is_better else value < best[1]):
            best = (int(record["round"]), float(value))
    return best
