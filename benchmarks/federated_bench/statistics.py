"""Paired statistics of the federated comparison: per-seed scores, C2A minus each method seed by seed, and bootstrap
intervals of those differences, so that the report claims a lead or a loss only where the interval excludes zero.

Runs of different methods with the same seed share the partition, the clients, their test splits and the client
sampling, so the difference of two methods on one seed is free of the partition's luck; the spread left over the
seeds is what the interval measures. A percentile bootstrap of the mean over few seeds is narrow (with 3 seeds it
can only take 10 distinct values), which is why protocol v2 asks for 5 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .protocol import tail_mean

# per-seed scores the report pairs: the final round's, each run's mean over its last rounds, and the 10th-percentile
# client (a worst client hinges on clients with a handful of test examples)
PAIRED_SCORES = (
    "personalized_mean_accuracy",
    "personalized_mean_accuracy_tail",
    "personalized_p10_accuracy",
    "global_accuracy",
    "unseen_mean_accuracy",
)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
# fewer paired seeds than this get no interval and no claim. With n seeds a resample repeats the smallest difference
# with probability n^-n: 1/27 (3.7%) at n = 3, above the 2.5% tail, so a 3-seed "95%" interval is just [min, max]
# and any three differences of one sign read as a lead (a 1-in-8 sign test); at n = 4 it is 0.4%
MIN_CLAIM_SEEDS = 4


def client_percentile(per_client: Mapping[str, Optional[float]], q: float = 10.0) -> Optional[float]:
    """The `q`-th percentile of the clients' accuracies (linear interpolation); `None` without clients."""
    values = [float(v) for v in per_client.values() if v is not None and math.isfinite(float(v))]
    return float(np.percentile(values, q)) if values else None


def per_seed_scores(runs: Sequence[Mapping[str, Any]], tail_rounds: int) -> dict[str, dict[int, float]]:
    """score -> seed -> value, for the runs of one method (ok runs only) and each score of `PAIRED_SCORES`."""
    out: dict[str, dict[int, float]] = {score: {} for score in PAIRED_SCORES}
    for run in runs:
        seed, derived = int(run["config"]["seed"]), run["derived"]
        values = {
            "personalized_mean_accuracy": derived["final"].get("personalized_mean_accuracy"),
            "personalized_mean_accuracy_tail": tail_mean(
                derived["curves"].get("personalized_mean_accuracy", []), tail_rounds
            ),
            "personalized_p10_accuracy": client_percentile(derived.get("per_client_accuracy", {})),
            "global_accuracy": derived["final"].get("global_accuracy"),
            "unseen_mean_accuracy": derived["final"].get("unseen_mean_accuracy"),
        }
        for score, value in values.items():
            if value is not None and math.isfinite(float(value)):
                out[score][seed] = float(value)
    return out


def bootstrap_interval(
    values: Sequence[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (deterministic in `seed`)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("No values to bootstrap.")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_difference(reference: Mapping[int, float], other: Mapping[int, float]) -> Optional[dict[str, Any]]:
    """`reference - other` on the seeds both have: per seed, their mean, the bootstrap interval, and the verdict
    (`"lead"` / `"loss"` only when the interval excludes 0, else `"no claim"`); `None` without a common seed. With
    fewer than `MIN_CLAIM_SEEDS` common seeds the interval is `None` and the verdict `"too few seeds"`."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None
    differences = [reference[seed] - other[seed] for seed in seeds]
    interval: Optional[list[float]] = None
    verdict = "too few seeds"
    if len(seeds) >= MIN_CLAIM_SEEDS:
        low, high = bootstrap_interval(differences)
        interval = [low, high]
        verdict = "lead" if low > 0 else "loss" if high < 0 else "no claim"
    return {
        "seeds": seeds,
        "per_seed": differences,
        "mean": float(np.mean(differences)),
        "interval": interval,
        "verdict": verdict,
    }


def paired_against(rows: Mapping[str, Mapping[str, Any]], reference: str = "c2a") -> dict[str, dict[str, Any]]:
    """method -> score -> `paired_difference(reference's per-seed scores, the method's)` for every other method."""
    if reference not in rows:
        return {}
    mine = rows[reference]["per_seed"]
    return {
        method: {score: paired_difference(mine[score], row["per_seed"][score]) for score in PAIRED_SCORES}
        for method, row in rows.items()
        if method != reference
    }


def paired_markdown(paired: Mapping[str, Mapping[str, Any]], reference: str = "c2a") -> list[str]:
    """The report's table of paired differences (empty without any)."""
    if not any(cell for cells in paired.values() for cell in cells.values()):
        return []
    labels = {
        "personalized_mean_accuracy": "personalised mean",
        "personalized_mean_accuracy_tail": "personalised mean, last rounds",
        "personalized_p10_accuracy": "10th-percentile client",
        "global_accuracy": "global",
        "unseen_mean_accuracy": "unseen mean",
    }
    lines = [
        f"Paired by seed: {reference} minus each method, mean and {LEVEL:.0%} percentile-bootstrap interval "
        f"({BOOTSTRAP_RESAMPLES:,} resamples); *lead* / *loss* only where the interval excludes 0; no interval and no "
        f"claim with fewer than {MIN_CLAIM_SEEDS} paired seeds.",
        "",
        "| method | seeds | " + " | ".join(labels[score] for score in PAIRED_SCORES) + " |",
        "|---|---|" + "---|" * len(PAIRED_SCORES),
    ]
    for method, cells in paired.items():
        seeds = next((cell["seeds"] for cell in cells.values() if cell), [])
        row = [_paired_cell(cells[score]) for score in PAIRED_SCORES]
        lines.append(f"| {method} | {','.join(map(str, seeds)) or '–'} | " + " | ".join(row) + " |")
    return lines + [""]


def _paired_cell(cell: Optional[Mapping[str, Any]]) -> str:
    if cell is None:
        return "–"
    if cell["interval"] is None:
        return f"{cell['mean']:+.3f} ({cell['verdict']})"
    low, high = cell["interval"]
    return f"{cell['mean']:+.3f} [{low:+.3f}, {high:+.3f}] {cell['verdict']}"
