"""The federated benchmark's protocol: its methods, the settings that define a run, run specifications and run
files, provenance, and the pure helpers that selection and report share.

Imported by the command line (benchmarks/federated.py), the worker and the report; imports none of them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RUN_FORMAT = 1


@dataclass(frozen=True)
class Method:
    """How a benchmark method maps onto the example's model builder and the trainer's arguments."""

    peft_method: str  # the example's --peft_method: c2a, bottleneck, lora, head (none: no model)
    aggregation: str
    federation_mode: str
    description: str
    script_options: tuple[
        tuple[str, Any], ...
    ] = ()  # further `peft_c2a.recipes.AdapterArguments` fields (C2A ablations)
    trainer_options: tuple[tuple[str, Any], ...] = ()  # further `FederatedTrainingArguments` fields


METHODS: dict[str, Method] = {
    "c2a": Method("c2a", "fedavg", "federated", "C2A, FedAvg"),
    "bottleneck": Method("bottleneck", "fedavg", "federated", "FedAvg + plain bottleneck adapters (same r)"),
    "lora": Method("lora", "fedavg", "federated", "FedAvg + LoRA on query/value"),
    "fedprox_lora": Method("lora", "fedprox", "federated", "FedProx + LoRA on query/value"),
    # FedProx's mu, tuned as protocol v2 asks: each value is a variant with its own lr selection; every variant counts
    # as a baseline, so C2A is held to the best of them on test data (a choice that can only favour FedProx)
    "fedprox_lora_mu0.001": Method(
        "lora", "fedprox", "federated", "FedProx (mu 0.001) + LoRA", trainer_options=(("proximal_mu", 0.001),)
    ),
    "fedprox_lora_mu0.1": Method(
        "lora", "fedprox", "federated", "FedProx (mu 0.1) + LoRA", trainer_options=(("proximal_mu", 0.1),)
    ),
    "head": Method("head", "fedavg", "federated", "FedAvg + classifier head only"),
    "local": Method("bottleneck", "fedavg", "local", "local-only bottleneck adapters, one model per client"),
    "centralized": Method("c2a", "fedavg", "centralized", "C2A on all training data pooled (upper bound)"),
    "centralized_lora": Method("lora", "fedavg", "centralized", "LoRA on all training data pooled (upper bound)"),
    "centralized_bottleneck": Method(
        "bottleneck", "fedavg", "centralized", "bottleneck adapters on all training data pooled (upper bound)"
    ),
    "prior_only": Method(
        "none", "none", "none", "model-free guess: each client predicts its majority training label (no training)"
    ),
    # ablations of C2A: one part of the method switched off (or on), all else equal
    "c2a_no_context": Method(
        "c2a", "fedavg", "federated", "C2A without the context term", (("c2a_use_context", False),)
    ),
    "c2a_no_label": Method(
        "c2a",
        "fedavg",
        "federated",
        "C2A without the label term (logit adjustment kept)",
        (("c2a_use_label_term", False),),
    ),
    "c2a_no_logit": Method(
        "c2a", "fedavg", "federated", "C2A without the logit adjustment", (("c2a_logit_adjustment", 0.0),)
    ),
    "c2a_client_id": Method(
        "c2a", "fedavg", "federated", "C2A with a per-client embedding", (("c2a_client_embeddings", True),)
    ),
    # C2A-LoRA as it is shipped: rank-lora_r LoRA factors on query/value (the LoRA baseline's shape), no context term,
    # so every client's adapter exports as a plain, mergeable LoRA
    "c2a_lora": Method(
        "c2a",
        "fedavg",
        "federated",
        "C2A generating LoRA on query/value, no context term (exportable)",
        (("c2a_adapter_kind", "lora"), ("c2a_use_context", False)),
    ),
    # protocol v2's personalised baselines (issue 20): what a reviewer compares a personalised method with
    "lora_prior": Method(
        "lora",
        "fedavg",
        "federated",
        "FedAvg + LoRA, class scores adjusted by each client's own label prior at evaluation (tau 1, free)",
        trainer_options=(("eval_logit_adjustment", 1.0),),
    ),
    "lora_ft": Method(
        "lora",
        "fedavg",
        "federated",
        "FedAvg + LoRA, then 5 local fine-tuning steps per client before its evaluation (FedAvg-FT)",
        trainer_options=(("personalization_steps", 5),),
    ),
    "c2a_ft": Method(
        "c2a",
        "fedavg",
        "federated",
        "C2A, then 5 local fine-tuning steps per client before its evaluation (C2A-FT)",
        trainer_options=(("personalization_steps", 5),),
    ),
}
MODEL_FREE = ("prior_only",)  # methods that train nothing: no learning rate, no selection
# what C2A must beat (the prior-only guess included: a personalised win means beating it); centralized is a bound
BASELINES = (
    "bottleneck",
    "lora",
    "fedprox_lora",
    "fedprox_lora_mu0.001",
    "fedprox_lora_mu0.1",
    "head",
    "local",
    "prior_only",
    "lora_prior",
    "lora_ft",
)
# the comparison a benchmark runs unless told otherwise; the C2A ablations are chosen with --methods
DEFAULT_METHODS = ("c2a", "bottleneck", "lora", "fedprox_lora", "head", "local", "centralized", "prior_only")
UPPER_BOUNDS = ("centralized", "centralized_lora", "centralized_bottleneck")
SCENARIOS = ("label_skew", "language_skew")
PHASES = ("select", "final")
VALIDATION_PHASES = ("budget", "select")  # phases that train on the fit carve and evaluate on validation data
# The targets are checked on these scenarios: (scenario, alpha or None for any alpha).
TARGET_SCENARIOS = (("label_skew", 0.1), ("language_skew", None))
WORST_CLIENT_MARGIN = 0.02  # C2A must beat the best baseline's worst-client accuracy by 2 points
# protocol v2's targets (issue 20): C2A against the best of the personalised baselines on the personalised mean, and
# against FedAvg-LoRA on global accuracy, each a paired interval that must exclude zero to pass
PERSONALISED_BASELINES = ("prior_only", "lora_prior", "lora_ft", "local")
ROUNDS_FRACTION = 0.95  # rounds to reach 95 % of the best final personalised mean accuracy
TAIL_ROUNDS = 5  # the report also gives accuracies averaged over the last 5 rounds (the final round alone is noisy)
SELECTION_TIE_MARGIN = 0.01  # lr selection: validation scores within 1 point of the best are ties (-> smaller lr)
# Settings added after the first results: a run file without them was run with these values.
SETTING_DEFAULTS: dict[str, Any] = {
    "selection_rounds": 1,
    "selection_tie_margin": SELECTION_TIE_MARGIN,
    "round_lr_scheduler": "constant",
    "test_examples_per_client": 0,
    "selection_seeds": 1,
    "precision": "fp32",
}
GRID_EXTENSIONS = 2  # a chosen lr at an edge of the grid adds the next rate beyond it, up to 2 per side
SELECTION_RULE = (
    f"argmax of the final personalised mean validation accuracy; scores within {SELECTION_TIE_MARGIN} of the best "
    f"are ties -> smaller lr; failed runs never win; a winner at an edge of the grid adds the next rate beyond it "
    f"(up to {GRID_EXTENSIONS} per side)"
)
NO_SELECTION_RULE = "single-value grid: no selection runs"  # the lr is fixed, nothing to choose

# Settings of one run that define what is measured. Two files with different values here are not comparable, so a
# complete run file is reused only if they match (threads, paths and which runs to do are not part of it).
PROTOCOL_KEYS = (
    "num_clients",
    "clients_per_round",
    "unseen_fraction",
    "num_rounds",
    "local_steps",
    "batch_size",
    "eval_batch_size",
    "max_seq_length",
    "val_fraction",
    "min_client_size",
    "bottleneck_dim",
    "lora_r",
    "selection_rounds",
    "selection_tie_margin",
    "proximal_mu",
    "partition_seed",
    "selection_seed",
    "lr_scheduler",
    "weight_decay",
    "max_train_examples",
    "max_test_examples",
    "round_lr_scheduler",
    "test_examples_per_client",
    "selection_seeds",
    "precision",
)
LANGUAGE_KEYS = (
    "languages",
    "clients_per_language",
    "bible_translations",
    "bible_test_fraction",
    "bible_train_per_language",
    "bible_test_per_language",
)


def fmt_number(value: float) -> str:
    """A float as it appears in paths and tables: `0.1`, `0.0003`, `5` (shortest round-trip repr)."""
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(float(value))


def mean_std(values: Iterable[Optional[float]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; `None` / NaN entries are counted as missing.

    `std` is `None` with fewer than two values (a single seed has no spread), `mean` is `None` with none.
    """
    raw = list(values)
    finite = [float(v) for v in raw if v is not None and math.isfinite(float(v))]
    mean = float(np.mean(finite)) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) >= 2 else None
    return {"mean": mean, "std": std, "n": len(finite), "missing": len(raw) - len(finite)}


def rounds_to_reach(curve: Sequence[tuple[int, Optional[float]]], threshold: float) -> Optional[int]:
    """The first round whose value is >= `threshold` (rounds in increasing order), or `None` if it is never reached."""
    for round_index, value in sorted(curve, key=lambda point: point[0]):
        if value is not None and math.isfinite(value) and value >= threshold:
            return int(round_index)
    return None


def tail_mean(curve: Sequence[Sequence[Any]], rounds: int) -> Optional[float]:
    """The mean of a `(round, value)` curve over its last `rounds` rounds (`None` without finite values there).

    With a constant learning rate and 10 of 16 label-skewed clients per round, the global model swings from round to
    round; the final round alone is then a noisy reading, and the tail mean says what a run settles at.
    """
    tail = sorted(curve, key=lambda point: point[0])[-rounds:]
    values = [float(v) for _, v in tail if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else None


def select_lr(scores: Mapping[float, Optional[float]], margin: float = 0.0) -> float:
    """The learning rate with the highest criterion; a failed (None/NaN) run never wins.

    Scores within `margin` of the best count as ties; ties go to the smallest lr.

    Raises:
        ValueError: no scores, or every run failed.
    """
    usable = {float(lr): float(s) for lr, s in scores.items() if s is not None and math.isfinite(float(s))}
    if not usable:
        raise ValueError(f"No usable selection run among learning rates {sorted(scores)}.")
    best = max(usable.values())
    return min(lr for lr, score in usable.items() if score >= best - margin)


def next_rate_beyond(grid: Sequence[float], upward: bool) -> float:
    """The grid continued one step past its largest (`upward`) or smallest rate: its own rates moved by a decade.

    {1e-4, 3e-4, ..., 1e-2, 3e-2} continues with 1e-1, then 3e-1 upward and with 3e-5, then 1e-5 downward.
    """
    # rounded to 12 digits: 0.03 * 10 is 0.30000000000000004 and 3e-4 / 10 is 2.9999999999999997e-05 (below 3e-5)
    shifted = [float(f"{lr * 10 if upward else lr / 10:.12g}") for lr in grid]
    return min(x for x in shifted if x > max(grid)) if upward else max(x for x in shifted if x < min(grid))


def resolve_selection(
    grid: Sequence[float],
    scores: Mapping[float, Optional[float]],
    extensions: int = GRID_EXTENSIONS,
    margin: float = SELECTION_TIE_MARGIN,
) -> tuple[Optional[float], list[float], list[float]]:
    """Apply the selection rule to the scores at hand: `(chosen lr or None, grid, missing lrs)`.

    The grid grows while the winner sits at one of its edges: a method whose best rate is the largest (smallest) one
    tried may do better beyond it, and no method should be capped by the grid. Each step adds the next rate beyond
    that edge (`next_rate_beyond`), at most `extensions` per side; `missing` then names the select run the selection
    waits for. A one-value grid needs no selection. `chosen` is `None` while runs are missing or when every run
    failed (`missing` is then empty).
    """
    grid = sorted({float(lr) for lr in grid})
    if len(grid) == 1:
        return grid[0], grid, []
    added = {True: 0, False: 0}  # extensions made upward / downward
    while True:
        missing = [lr for lr in grid if lr not in scores]
        if missing:
            return None, grid, missing
        try:
            chosen = select_lr({lr: scores[lr] for lr in grid}, margin)
        except ValueError:  # every run failed
            return None, grid, []
        if chosen not in (grid[0], grid[-1]):
            return chosen, grid, []
        upward = chosen == grid[-1]
        if added[upward] >= extensions:
            return chosen, grid, []
        added[upward] += 1
        grid = sorted([*grid, next_rate_beyond(grid, upward)])


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_file_mode() -> int:
    """The mode `open()` gives a new file (0666 minus the umask); mkstemp's 0600 would hide shared results."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# =====================================================================================================================
# Run specifications and files
# =====================================================================================================================


@dataclass
class RunSpec:
    """One training run: a scenario / alpha / method / phase / lr / seed plus the protocol settings."""

    scenario: str
    alpha: float
    method: str
    phase: str
    lr: float
    seed: int
    settings: dict[str, Any]  # protocol settings (PROTOCOL_KEYS, + LANGUAGE_KEYS for language_skew)
    lr_grid: list[float] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)  # final runs: how their lr was chosen
    budget: dict[str, Any] = field(default_factory=dict)  # num_rounds="plateau": how the rounds were decided
    threads: int = 1
    model_path: Optional[str] = None  # language_skew: the converted e5 folder (machine-specific, not protocol)
    command: str = ""

    def relative_path(self) -> Path:
        return (
            Path("runs")
            / self.scenario
            / f"alpha-{fmt_number(self.alpha)}"
            / self.method
            / self.phase
            / f"lr-{fmt_number(self.lr)}"
            / f"seed-{self.seed}.json"
        )

    def label(self) -> str:
        return (
            f"{self.scenario} alpha={fmt_number(self.alpha)} {self.method:<12} {self.phase:<6} "
            f"lr={fmt_number(self.lr):<7} seed={self.seed}"
        )


def read_run(path: Path) -> Optional[dict[str, Any]]:
    """A complete run file, or `None` if it is missing or unreadable (a file is written atomically, so a readable
    file with `complete: true` is whole)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) and document.get("complete") is True else None


def protocol_mismatch(document: Mapping[str, Any], spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """Protocol settings that differ between a run file and the spec that would redo it: {key: (file, now)}."""
    old = {**SETTING_DEFAULTS, **document.get("config", {}).get("settings", {})}
    return {key: (old.get(key), value) for key, value in spec.settings.items() if old.get(key) != value}


def setting(settings: Mapping[str, Any], key: str) -> Any:
    """A protocol setting of a run, with `SETTING_DEFAULTS` for files written before the setting existed."""
    return {**SETTING_DEFAULTS, **settings}[key]


def selection_seeds(settings: Mapping[str, Any]) -> list[int]:
    """The seeds of the learning-rate selection: `selection_seed` and the `selection_seeds - 1` after it (a rate's
    score is the mean of its runs' criteria over them; protocol v2 uses 2)."""
    first = int(settings["selection_seed"])
    return [first + i for i in range(int(setting(settings, "selection_seeds")))]


def mean_criterion(criteria: Sequence[Optional[float]]) -> Optional[float]:
    """A rate's selection score: the mean of its runs' criteria, `None` if any run failed (failed runs never win)."""
    if not criteria or any(value is None for value in criteria):
        return None
    return float(np.mean(criteria))


def selection_rule(settings: Mapping[str, Any]) -> str:
    """The lr-selection rule of a protocol, in words."""
    rounds = settings.get("selection_rounds", SETTING_DEFAULTS["selection_rounds"])
    margin = settings.get("selection_tie_margin", SETTING_DEFAULTS["selection_tie_margin"])
    criterion = (
        "the final personalised mean validation accuracy"
        if rounds == 1
        else f"the personalised mean validation accuracy averaged over the last {rounds} rounds"
    )
    ties = f"scores within {margin} of the best are ties -> smaller lr; " if margin else ""
    seeds = selection_seeds(settings) if "selection_seed" in settings else [0]
    over = f", mean over selection seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    return (
        f"argmax of {criterion}{over}; {ties}failed runs never win; a winner at an edge of the grid adds the next rate "
        f"beyond it (up to {GRID_EXTENSIONS} per side)"
    )
