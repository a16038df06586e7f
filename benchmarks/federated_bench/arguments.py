"""The federated benchmark's command line: its flags, and the presets that replace their defaults.

`--quick` is a two-minute smoke run. `--protocol v2` is issue 20's comparison, fixed here before any of its runs:
the same learning-rate grid and rule for every method (validation data carved from the clients' training data, the
mean over the last 5 rounds, 2 selection seeds, no tie margin), one cosine decay across rounds for every method, a
budget decided by probe curves (`budget.py`: rounds to the plateau, one epoch of the mean client per round), 20 test
examples per client, 5 paired final seeds, bf16 mixed precision for every method, every baseline a personalised-FL
reviewer asks for, and its own output folder so that v1's files are never mixed in. Changing a value here after its
runs started changes the protocol: the runner refuses to mix run files whose settings differ.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from .budget import EPOCH_STEPS, PLATEAU_ROUNDS
from .protocol import BASELINES, DEFAULT_METHODS, METHODS, ROOT, SCENARIOS

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "federated"

QUICK = dict(
    scenarios=["label_skew"],
    alphas=[0.1],
    methods=list(DEFAULT_METHODS),
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
# issue 20's method list: C2A v2 and its ablations, the federated baselines (FedProx at three strengths), the
# personalised baselines (prior-only, logit adjustment, FedAvg-FT and C2A-FT with the same steps), local-only, and a
# centralised bound for every adapter
PROTOCOL_V2_METHODS = (
    "c2a",
    "c2a_no_context",
    "c2a_no_label",
    "c2a_no_logit",
    "c2a_client_id",
    *BASELINES,  # every method C2A is held to, the personalised ones included
    "c2a_ft",
    "centralized",
    "centralized_lora",
    "centralized_bottleneck",
)
PROTOCOL_V2: dict[str, Any] = dict(
    scenarios=list(SCENARIOS),
    alphas=[0.1, 0.5],
    methods=list(PROTOCOL_V2_METHODS),
    seeds=[0, 1, 2, 3, 4],
    lrs=[1e-3, 3e-3, 1e-2],
    selection_seeds=2,
    selection_rounds=5,
    selection_tie_margin=0.0,
    round_lr_scheduler="cosine",
    test_examples_per_client=20,
    # every method in bf16 mixed precision: 1.7-1.9x faster steps on this VM's CPU (docs/benchmarks.md), the
    # precision a GPU shard runs in too
    precision="bf16",
    num_rounds=PLATEAU_ROUNDS,
    local_steps=EPOCH_STEPS,
    output_dir=str(ROOT / "benchmarks" / "results" / "federated_v2"),
)
PROTOCOLS = {"v2": PROTOCOL_V2}


def _rounds(text: str) -> int | str:
    return _count_or(text, PLATEAU_ROUNDS)


def _steps(text: str) -> int | str:
    return _count_or(text, EPOCH_STEPS)


def _count_or(text: str, word: str) -> int | str:
    if text == word:
        return word
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {word!r}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {word!r}, got {text!r}")
    return value


def _translation(text: str) -> tuple[str, str]:
    language, separator, name = text.partition("=")
    if not separator or not language or not name:
        raise argparse.ArgumentTypeError(f"expected LANG=BBNAME, got {text!r}")
    return language, name


def parse_args(argv: Optional[list[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """The benchmark's arguments; `--quick` and `--protocol v2` replace the defaults only (explicit flags win)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("what to run")
    run.add_argument("--quick", action="store_true", help="tiny preset: label_skew, alpha 0.1, 1 lr, 1 seed, 2 rounds")
    run.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default=None,
        help="a frozen protocol's defaults (v2: issue 20's comparison, in benchmarks/results/federated_v2)",
    )
    run.add_argument("--report", action="store_true", help="only write the summary from the run files")
    run.add_argument("--no_report", action="store_true", help="do not write the summary after running")
    run.add_argument("--dry_run", action="store_true", help="list done / pending / blocked runs, run nothing")
    run.add_argument("--retry_failed", action="store_true", help="rerun runs recorded as failed")
    run.add_argument(
        "--phase",
        choices=("budget", "select", "final", "all"),
        default="all",
        help='"all": the budget probes (only with --num_rounds plateau), then selection, then the final runs',
    )
    run.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    run.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5, 5.0], help="label_skew Dirichlet alphas")
    run.add_argument("--language_alpha", type=float, default=0.5, help="Dirichlet alpha inside each language")
    run.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
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
    protocol.add_argument(
        "--selection_seeds",
        type=int,
        default=1,
        help="how many selection seeds (selection_seed, selection_seed + 1, ...) a rate's score averages over",
    )
    protocol.add_argument("--partition_seed", type=int, default=0, help="seed of splits, partitions, unseen clients")
    protocol.add_argument("--num_clients", type=int, default=20, help="label_skew clients")
    protocol.add_argument("--clients_per_round", type=int, default=10)
    protocol.add_argument("--unseen_fraction", type=float, default=0.2)
    protocol.add_argument(
        "--num_rounds", type=_rounds, default=15, help=f"rounds, or {PLATEAU_ROUNDS!r}: decided by budget probes"
    )
    protocol.add_argument(
        "--local_steps",
        type=_steps,
        default=5,
        help=f"local optimizer steps per client per round, or {EPOCH_STEPS!r}: one epoch of the mean training client",
    )
    protocol.add_argument("--batch_size", type=int, default=16)
    protocol.add_argument("--eval_batch_size", type=int, default=64)
    protocol.add_argument("--max_seq_length", type=int, default=64)
    protocol.add_argument("--val_fraction", type=float, default=0.15, help="validation share of each client (select)")
    protocol.add_argument("--min_client_size", type=int, default=8)
    protocol.add_argument("--bottleneck_dim", type=int, default=16, help="r of C2A and the bottleneck adapters")
    protocol.add_argument("--lora_r", type=int, default=8)
    protocol.add_argument(
        "--selection_rounds", type=int, default=1, help="lr criterion: validation mean over the last N rounds"
    )
    protocol.add_argument(
        "--selection_tie_margin", type=float, default=0.01, help="lr criterion: scores this close to the best tie"
    )
    protocol.add_argument("--proximal_mu", type=float, default=0.01, help="FedProx strength (fedprox_lora)")
    protocol.add_argument("--lr_scheduler", default="constant", help="the schedule within a client's round")
    protocol.add_argument(
        "--round_lr_scheduler",
        default="constant",
        choices=("constant", "linear", "cosine"),
        help="the learning rate's decay across rounds (FederatedTrainingArguments.round_lr_scheduler)",
    )
    protocol.add_argument(
        "--test_examples_per_client",
        type=int,
        default=0,
        help="draw this many personal test examples per client with its label mix (sample_like); 0: each client's "
        "proportional share of the test split (partition_like)",
    )
    protocol.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: mixed precision (bf16 autocast, fp32 weights; on CPUs with bf16 instructions and on GPUs)",
    )
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
    if args.quick and args.protocol:
        parser.error("--quick and --protocol are two presets; choose one")
    preset = QUICK if args.quick else PROTOCOLS.get(args.protocol)
    if preset:
        # the preset replaces the defaults only: flags given explicitly still win
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args
