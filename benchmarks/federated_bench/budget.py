"""Protocol v2's training budget, decided by curves before any selection or final run reads a number.

A comparison at a budget where the methods still improve measures how fast they start, not where they get; the v1
budget (15 rounds of 5 local steps) left every federated method rising under language skew. Protocol v2 therefore
fixes the *rule*, not the number, and lets the rule read probe runs:

- **Local steps** (`local_steps="epoch"`): one epoch of the mean training client per round, the same number of steps
  for every client and method (`epoch_steps`). It is computed from the partition of the full training data, so the
  budget, selection and final runs of a scenario take the same number of steps.
- **Rounds** (`num_rounds="plateau"`): budget probes (phase `"budget"`) train `PROBE_METHODS` (C2A and FedAvg-LoRA,
  the strongest federated methods of the earlier measurements) for `PROBE_ROUNDS` rounds at `PROBE_LR` under a
  constant rate, on the validation carve of the selection seed (test data is never read). A curve's plateau round is
  the first round whose trailing `PLATEAU_WINDOW`-round mean comes within `PLATEAU_TOLERANCE` of the best
  trailing mean of the whole probe (`plateau_round`); the budget is the latest plateau of the probes, rounded up to a
  multiple of `ROUND_MULTIPLE`, and at least `MIN_ROUNDS` (`budget_rounds`).

The probe rate is the middle of the grid: a larger rate plateaus earlier, so this errs toward more rounds. A probe
that never comes within the tolerance before its last round cannot happen (the best window is itself within it);
a probe whose best window is its last one says the probe was too short, and the record says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .protocol import RunSpec, read_run

BUDGET_PHASE = "budget"
PROBE_METHODS = ("c2a", "lora")
PROBE_LR = 3e-3
PROBE_ROUNDS = 60
PLATEAU_WINDOW = 5
PLATEAU_TOLERANCE = 0.01
MIN_ROUNDS = 15
ROUND_MULTIPLE = 5
PLATEAU_ROUNDS = "plateau"  # the `num_rounds` value that asks for this rule
EPOCH_STEPS = "epoch"  # the `local_steps` value that asks for one epoch of the mean client
BUDGET_RULE = (
    f"rounds: latest plateau of {', '.join(PROBE_METHODS)} probed for {PROBE_ROUNDS} rounds at lr {PROBE_LR} "
    f"(constant, validation carve of the selection seed): the first round whose trailing {PLATEAU_WINDOW}-round "
    f"mean personalised validation accuracy is within {PLATEAU_TOLERANCE} of the probe's best trailing mean; rounded "
    f"up to a multiple of {ROUND_MULTIPLE}, at least {MIN_ROUNDS}"
)


def epoch_steps(train_sizes: Sequence[int], batch_size: int) -> int:
    """Local steps of one epoch of the mean client: `ceil(mean(train_sizes) / batch_size)`, at least 1."""
    sizes = [int(size) for size in train_sizes]
    if not sizes or batch_size < 1:
        raise ValueError(f"Need training clients and a positive batch size, got {sizes!r} and {batch_size}.")
    return max(1, math.ceil(sum(sizes) / len(sizes) / batch_size))


def resolve_local_steps(settings: Mapping[str, Any], train_sizes: Sequence[int]) -> int:
    """A run's local steps: the integer setting, or `epoch_steps` of the training clients for `"epoch"`."""
    value = settings["local_steps"]
    if value == EPOCH_STEPS:
        return epoch_steps(train_sizes, int(settings["batch_size"]))
    return int(value)


def trailing_means(curve: Sequence[Sequence[Any]], window: int = PLATEAU_WINDOW) -> list[tuple[int, float]]:
    """`(round, mean of the last `window` values up to it)` for every round that has `window` values behind it."""
    points = [(int(r), float(v)) for r, v in curve if v is not None and math.isfinite(float(v))]
    return [
        (points[i][0], sum(v for _, v in points[i - window + 1 : i + 1]) / window)
        for i in range(window - 1, len(points))
    ]


def plateau_round(
    curve: Sequence[Sequence[Any]], window: int = PLATEAU_WINDOW, tolerance: float = PLATEAU_TOLERANCE
) -> Optional[int]:
    """The first round whose trailing `window`-round mean is within `tolerance` of the curve's best trailing mean;
    `None` for a curve shorter than `window`."""
    means = trailing_means(curve, window)
    if not means:
        return None
    best = max(value for _, value in means)
    return next(round_index for round_index, value in means if value >= best - tolerance)


def budget_rounds(plateaus: Sequence[int]) -> int:
    """The rounds every method trains: the latest plateau, rounded up to `ROUND_MULTIPLE`, at least `MIN_ROUNDS`."""
    if not plateaus:
        raise ValueError("No plateau to size the budget from.")
    latest = max(int(p) for p in plateaus)
    return max(MIN_ROUNDS, ROUND_MULTIPLE * math.ceil(latest / ROUND_MULTIPLE))


def probe_specs(template: RunSpec) -> list[RunSpec]:
    """The budget probes of `template`'s scenario / alpha (its settings with `num_rounds="plateau"`)."""
    settings = {**template.settings, "num_rounds": PROBE_ROUNDS, "round_lr_scheduler": "constant"}
    return [
        RunSpec(
            **{
                **asdict(template),
                "method": method,
                "phase": BUDGET_PHASE,
                "lr": PROBE_LR,
                "lr_grid": [PROBE_LR],
                "seed": int(template.settings["selection_seed"]),
                "settings": settings,
                "selection": {},
                "budget": {},
            }
        )
        for method in PROBE_METHODS
    ]


def resolve_budget(output_dir: Path, template: RunSpec) -> tuple[Optional[int], dict[str, Any]]:
    """The rounds decided by the probe files of `template`'s scenario / alpha, and the record a run file keeps.

    Returns `(None, record)` while a probe is missing (`record["missing"]`) or failed (`record["failed"]`).
    """
    return decide_budget(
        {probe.method: read_run(output_dir / probe.relative_path()) for probe in probe_specs(template)}
    )


def decide_budget(probes: Mapping[str, Optional[Mapping[str, Any]]]) -> tuple[Optional[int], dict[str, Any]]:
    """`resolve_budget` on probe run documents (method -> document, `None` when missing)."""
    plateaus: dict[str, Optional[int]] = {}
    best_is_last: dict[str, bool] = {}
    missing = [method for method, document in probes.items() if document is None]
    failed = [method for method, document in probes.items() if document is not None and document["status"] != "ok"]
    for method, document in probes.items():
        if method in missing or method in failed:
            continue
        curve = document["derived"]["curves"]["personalized_mean_accuracy"]
        # the module's constants read at call time, not bound as defaults, so that a test can shorten the rule
        plateaus[method] = plateau_round(curve, PLATEAU_WINDOW, PLATEAU_TOLERANCE)
        means = trailing_means(curve, PLATEAU_WINDOW)
        # the best window is the probe's last: the curve may still rise, so the probe was too short to tell
        best_is_last[method] = bool(means) and max(means, key=lambda item: item[1])[0] == means[-1][0]
    record: dict[str, Any] = {
        "rule": BUDGET_RULE,
        "plateau_rounds": plateaus,
        "best_window_is_last": best_is_last,
        "missing": missing,
        "failed": failed,
    }
    found = [p for p in plateaus.values() if p is not None]
    if missing or failed or not found:
        return None, record
    record["num_rounds"] = budget_rounds(found)
    return record["num_rounds"], record
