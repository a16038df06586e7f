"""Federated benchmark: C2A against FedAvg / FedProx baselines, side by side, on the same partitions and seeds.

Methods are built by `peft_c2a.recipes` and all run through `FederatedTrainer` (`federated_bench/protocol.py` lists
them: C2A and its ablations, plain bottleneck adapters, LoRA under FedAvg and FedProx, head only, local-only,
centralised, and the model-free prior-only guess). Scenarios: `label_skew` (the packaged MiniLM on BBC News, Dirichlet
label skew, one run per alpha) and `language_skew` (multilingual e5 on Bible book genres, clients of one language
each with Dirichlet labels inside). A share of the clients never trains and is evaluated as unseen. The partition,
the unseen clients and the validation carve depend on `--partition_seed` only, so every method and seed sees the
same clients; a run's seed sets the model initialisation, the client sampling and the local shuffling.

Protocol:

0. Budget (phase "budget", only with `--num_rounds plateau`): C2A and FedAvg-LoRA train `PROBE_ROUNDS` rounds at one
   rate and a constant schedule on the selection seed's fit / validation splits; the rounds of every method are the
   latest round at which a probe's trailing validation mean reached its plateau (`federated_bench/budget.py`), so
   the budget is decided on validation curves before any selection or final run exists. `--local_steps epoch` gives
   every client one epoch of the mean training client per round.
1. Learning-rate selection (phase "select"): every method runs every rate of `--lrs` with `--selection_seed` on
   fit / validation splits of each client's training data (`--val_fraction`); the criterion is the personalised mean
   validation accuracy, averaged over the last `--selection_rounds` rounds, the same for every method; scores within
   `--selection_tie_margin` of the best are ties, which go to the smaller rate; a winner at an edge of the grid adds
   the next rate beyond it (`resolve_selection`) and the final runs wait for it.
2. Final runs (phase "final"): the chosen rate, every seed of `--seeds`, the full client training data, evaluated on
   the global test set, on each client's personal test split and on the unseen clients.

Every run executes in a fresh subprocess and writes one JSON file, atomically, to
`<output_dir>/runs/<scenario>/alpha-<a>/<method>/<phase>/lr-<lr>/seed-<s>.json` (configuration, environment, full
history, derived figures). Complete files are skipped, so a benchmark resumes and splits into chunks (`--scenarios`,
`--alphas`, `--methods`, `--seeds`, `--phase`); a failed run is not retried without `--retry_failed`; `--jobs N`
runs N at a time. `--report` writes summary.{json,csv,md} and plots/ with means and spreads over seeds, the chosen
rates, bytes, parameters, step times, memory and the targets as PASS / FAIL lines. The defaults, their costs and the
results are in docs/benchmarks.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated.py --quick --output_dir /tmp/fed-quick   # ~2 min
    .venv/bin/python benchmarks/federated.py --scenarios label_skew --alphas 0.1 --phase all
    .venv/bin/python benchmarks/federated.py --protocol v2 --dry_run    # issue 20's frozen protocol and its cost
    .venv/bin/python benchmarks/federated.py --dry_run          # what is done, pending or blocked
    .venv/bin/python benchmarks/federated.py --report
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from queue import PriorityQueue
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.federated_bench` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.federated_bench import arguments, federation, worker  # noqa: E402
from benchmarks.federated_bench import report as reporting  # noqa: E402
from benchmarks.federated_bench.budget import BUDGET_PHASE, PLATEAU_ROUNDS, probe_specs, resolve_budget  # noqa: E402
from benchmarks.federated_bench.protocol import (  # noqa: E402
    LANGUAGE_KEYS,
    MODEL_FREE,
    NO_SELECTION_RULE,
    PHASES,
    PROTOCOL_KEYS,
    SETTING_DEFAULTS,
    RunSpec,
    fmt_number,
    mean_criterion,
    protocol_mismatch,
    read_run,
    resolve_selection,
    selection_rule,
    selection_seeds,
)

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

    Returns `(None, record)` while select runs are missing (`record["missing"]`: those of `grid` or the rates the
    selection added beyond an edge of it, `resolve_selection`) or when every select run failed.
    """
    scores: dict[float, Optional[float]] = {}
    absent: set[float] = set()
    while True:  # read the runs the rule asks for until it decides or waits for runs not on disk
        margin = {**SETTING_DEFAULTS, **template.settings}["selection_tie_margin"]
        chosen, extended, missing = resolve_selection(grid, scores, margin=margin)
        unread = [lr for lr in missing if lr not in absent]
        if not unread:
            break
        for lr in unread:
            documents = [
                read_run(
                    output_dir
                    / RunSpec(**{**asdict(template), "phase": "select", "lr": lr, "seed": seed}).relative_path()
                )
                for seed in selection_seeds(template.settings)
            ]
            if any(document is None for document in documents):
                absent.add(lr)
            else:
                scores[lr] = mean_criterion([doc["derived"].get("criterion", {}).get("value") for doc in documents])
    record = {
        "rule": selection_rule(template.settings) if len(extended) > 1 else NO_SELECTION_RULE,
        "grid": extended,
        "selection_seed": template.settings["selection_seed"],
        "selection_seeds": selection_seeds(template.settings),
        "scores": {fmt_number(lr): scores[lr] for lr in extended if lr in scores},
        "missing": missing,
    }
    if chosen is not None:
        record["chosen_lr"] = chosen
    return chosen, record


def plan(args: argparse.Namespace, phase: str) -> list[RunSpec]:
    """The runs of one phase for the selected scenarios, alphas, methods (and seeds).

    The budget phase plans the probes of every scenario / alpha whose `num_rounds` is "plateau" (none otherwise);
    the other phases' runs then keep "plateau" in their settings until `prepare` reads the probes' decision."""
    specs = []
    for scenario in args.scenarios:
        settings = protocol_settings(args, scenario)
        for alpha in scenario_alphas(args, scenario):
            if phase == BUDGET_PHASE:
                if settings["num_rounds"] == PLATEAU_ROUNDS:
                    template = RunSpec(scenario, float(alpha), "", phase, 0.0, 0, settings, threads=args.threads)
                    specs += [replace(probe, command=command_line()) for probe in probe_specs(template)]
                continue
            for method in args.methods:
                lrs = [0.0] if method in MODEL_FREE else [float(lr) for lr in args.lrs]
                base = RunSpec(
                    scenario=scenario,
                    alpha=float(alpha),
                    method=method,
                    phase=phase,
                    lr=lrs[0],
                    seed=args.selection_seed,
                    settings=settings,
                    lr_grid=lrs,
                    threads=args.threads,
                    command=command_line(),
                )
                if phase == "select":
                    if len(lrs) > 1:
                        seeds = selection_seeds(settings)
                        specs += [RunSpec(**{**asdict(base), "lr": lr, "seed": seed}) for lr in lrs for seed in seeds]
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
    problems = 0
    if args.phase in ("all", BUDGET_PHASE):  # the probes decide the rounds every later run of their scenario takes
        problems += run_queue(plan(args, BUDGET_PHASE), output_dir, args)
        if args.phase == BUDGET_PHASE:
            return problems
    phases = PHASES if args.phase == "all" else (args.phase,)
    specs = sorted(
        (spec for phase in phases for spec in plan(args, phase)),
        key=lambda s: (args.scenarios.index(s.scenario), s.alpha, PHASES.index(s.phase)),
    )
    return problems + run_queue(specs, output_dir, args)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def run_queue(specs: Sequence[RunSpec], output_dir: Path, args: argparse.Namespace) -> int:
    """Run `specs`, `args.jobs` at a time, from a priority queue in `specs` order; each method's final runs are
    released when its selection is settled: the last of its select runs has finished, including any the selection
    adds beyond an edge of the grid (`resolve_selection`). With one job that is exactly the order of `specs`, each
    added select run going right after its method's others. Returns the number of runs that failed or could not
    start."""
    group = lambda spec: (spec.scenario, spec.alpha, spec.method)  # noqa: E731
    rank = {id(spec): i for i, spec in enumerate(specs)}
    order = itertools.count()  # breaks ties in rank (an added select run ranks like its method's others)
    queue: PriorityQueue = PriorityQueue()
    lock = threading.Lock()
    selects_running: Counter = Counter()
    select_templates: dict[tuple, RunSpec] = {}
    added_lrs: dict[tuple, set[float]] = {}
    held_finals: dict[tuple, list[RunSpec]] = {}
    state = {"problems": 0, "outstanding": 0}

    def enqueue(spec: RunSpec, priority: Optional[int] = None) -> None:  # with the lock held, or before the workers
        ready, problem = prepare(spec, output_dir, args)
        state["problems"] += problem
        if ready:
            if spec.scenario == "language_skew":
                spec.model_path = e5_model_path()
            state["outstanding"] += 1
            if spec.phase == "select":
                selects_running[group(spec)] += 1
            queue.put((rank[id(spec)] if priority is None else priority, next(order), spec))

    def settle(key: tuple) -> None:  # with the lock held: the group's select runs are done; queue what it lacks
        template = select_templates[key]
        _, record = selection_state(output_dir, template, template.lr_grid)
        tried = added_lrs.setdefault(key, set())
        # only rates beyond the grid are added here: a missing grid rate is a select run that could not start
        for lr in [lr for lr in record["missing"] if lr not in template.lr_grid and lr not in tried]:
            tried.add(lr)
            for seed in selection_seeds(template.settings):
                enqueue(RunSpec(**{**asdict(template), "lr": lr, "seed": seed}), priority=rank[id(template)])
        if not selects_running[key]:
            for final in held_finals.pop(key, []):
                enqueue(final)

    for spec in specs:  # budget probes and select runs start at once; finals wait for their selection
        if spec.phase == "select":
            select_templates.setdefault(group(spec), spec)
        if spec.phase != "final":
            enqueue(spec)
    for spec in specs:
        if spec.phase == "final":
            if group(spec) in select_templates:
                held_finals.setdefault(group(spec), []).append(spec)
            else:
                enqueue(spec)
    for key in select_templates:
        if not selects_running[key]:
            settle(key)

    def drain() -> None:  # one thread: take runs off the queue until a sentinel
        while True:
            spec = queue.get()[-1]
            if spec is None:
                return
            try:
                ok = run_in_subprocess(spec, output_dir, quiet=args.jobs > 1)
            except Exception as exc:  # e.g. no temporary space: count it, keep the bookkeeping (no hang)
                print(f"ERROR    {spec.label()}: {exc!r}", flush=True)
                ok = False
            with lock:
                state["problems"] += 0 if ok else 1
                if spec.phase == "select":
                    selects_running[group(spec)] -= 1
                    if not selects_running[group(spec)]:
                        settle(group(spec))
                state["outstanding"] -= 1
                if not state["outstanding"]:
                    for i in range(args.jobs):  # sentinels rank after every run
                        queue.put((math.inf, i, None))

    if not state["outstanding"]:
        return state["problems"]
    threads = [threading.Thread(target=drain, daemon=True) for _ in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state["problems"]


@functools.cache
def e5_model_path() -> str:
    """The converted e5 folder: converted once, here, in the parent, rather than racing in every worker."""
    return str(federation.language_support()[1]())


def prepare(spec: RunSpec, output_dir: Path, args: argparse.Namespace) -> tuple[bool, int]:
    """Resolve a run's rounds from its budget probes and a final run's lr from its selection, and decide whether
    `spec` must run: `(run it, problems)`.

    A complete run file with the same protocol is kept (failed ones are redone with --retry_failed); one with other
    protocol settings stops the benchmark rather than mixing protocols.
    """
    if spec.settings["num_rounds"] == PLATEAU_ROUNDS:
        rounds, record = resolve_budget(output_dir, spec)
        if rounds is None:
            why = f"missing {record['missing']}" if record["missing"] else f"failed {record['failed']}"
            print(f"blocked  {spec.label()}: budget probes {why}", flush=True)
            return False, 0 if args.dry_run else 1
        spec.settings, spec.budget = {**spec.settings, "num_rounds": rounds}, record
    if spec.phase == "final":
        chosen, record = selection_state(output_dir, spec, spec.lr_grid)
        if chosen is None:
            where = spec.label().split(" lr=")[0]  # no lr yet: it is what the selection decides
            why = (
                f"selection incomplete, missing lr {record['missing']}"
                if record["missing"]
                else "every select run failed"
            )
            print(f"blocked  {where} seed={spec.seed}: {why}", flush=True)
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
# Command line
# =====================================================================================================================


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return arguments.parse_args(argv, description=__doc__)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = RunSpec(**json.loads(Path(args._worker).read_text()))
        worker.run_single(spec, Path(args.output_dir))
        return 0
    if args.report:
        reporting.report(args)
        return 0
    start = time.time()
    problems = execute(args)
    if args.dry_run:
        return 0
    print(f"\nruns finished in {time.time() - start:.0f} s; {problems} failed or blocked", flush=True)
    if not args.no_report:
        reporting.report(args)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
