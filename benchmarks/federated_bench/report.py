"""The federated benchmark's report: run files -> summary.json / summary.csv / summary.md, plots and the issue's
targets (PASS / FAIL / MISSING).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks.support.machine import environment

from .budget import BUDGET_PHASE, PROBE_METHODS, decide_budget
from .protocol import (
    BASELINES,
    LANGUAGE_KEYS,
    METHODS,
    NO_SELECTION_RULE,
    PERSONALISED_BASELINES,
    ROUNDS_FRACTION,
    SETTING_DEFAULTS,
    TAIL_ROUNDS,
    TARGET_SCENARIOS,
    UPPER_BOUNDS,
    WORST_CLIENT_MARGIN,
    atomic_write_json,
    atomic_write_text,
    fmt_number,
    mean_criterion,
    mean_std,
    read_run,
    resolve_selection,
    rounds_to_reach,
    selection_rule,
    selection_seeds,
    tail_mean,
)
from .render import markdown, pm, write_csv, write_plots
from .statistics import client_percentile, paired_against, per_seed_scores

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
    probes: dict[tuple[str, float], dict[str, Mapping[str, Any]]] = {}
    for run in runs:
        config = run["config"]
        key = (config["scenario"], float(config["alpha"]))
        if config["phase"] == BUDGET_PHASE:
            probes.setdefault(key, {})[config["method"]] = run
            continue
        groups.setdefault(key, {}).setdefault(config["method"], {"select": [], "final": []})[config["phase"]].append(
            run
        )
    scenarios = []
    for scenario, alpha in sorted(set(groups) | set(probes)):
        methods = groups.get((scenario, alpha), {})
        rows: dict[str, dict[str, Any]] = {}
        for method in [m for m in METHODS if m in methods]:
            rows[method] = method_row(method, methods[method])
        finish_scenario(rows)
        hardware = sorted({hardware_line(run) for runs_ in methods.values() for run in runs_["final"]})
        scenarios.append(
            {
                "scenario": scenario,
                "alpha": alpha,
                "methods": rows,
                "hardware": hardware,
                "paired_vs_c2a": paired_against(rows, "c2a"),
                "budget": budget_record(probes.get((scenario, alpha))),
            }
        )
    return {"scenarios": scenarios}


def budget_record(probes: Optional[Mapping[str, Mapping[str, Any]]]) -> Optional[dict[str, Any]]:
    """How the budget probes of one scenario / alpha decide its rounds (`None` without probes)."""
    if not probes:
        return None
    return decide_budget({method: probes.get(method) for method in PROBE_METHODS})[1]


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
    settings = next((run["config"]["settings"] for run in [*finals, *runs["select"]]), {})
    seeds = selection_seeds(settings) if settings else []
    criteria: dict[float, dict[int, Optional[float]]] = {}
    for run in runs["select"]:
        if run["config"]["seed"] in seeds:
            by_seed = criteria.setdefault(float(run["config"]["lr"]), {})
            by_seed[int(run["config"]["seed"])] = run["derived"].get("criterion", {}).get("value")
    scores = {
        lr: mean_criterion(list(by_seed.values())) for lr, by_seed in criteria.items() if len(by_seed) == len(seeds)
    }
    chosen: Optional[float] = None
    margin = {**SETTING_DEFAULTS, **settings}["selection_tie_margin"]
    if grid:
        chosen, grid, missing = resolve_selection(grid, scores, margin=margin)
    if len(grid) == 1:
        rule = NO_SELECTION_RULE
    elif chosen is not None:
        rule = selection_rule(settings)
    else:
        rule = f"selection incomplete: missing lr {missing}" if missing else "every select run failed"
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
        # beside the worst client, which hinges on clients with a handful of test examples
        "personalized_p10_accuracy": stat(lambda run: client_percentile(run["derived"].get("per_client_accuracy", {}))),
        "personalized_weighted_accuracy": stat(final("personalized_weighted_accuracy")),
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
        "per_seed": per_seed_scores(ok, TAIL_ROUNDS),
        "min_global_predicted_classes": min(
            (
                run["derived"]["min_global_predicted_classes"]
                for run in ok
                if run["derived"].get("min_global_predicted_classes")
            ),
            default=None,
        ),
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
            lines += scenario_targets(scenario) + paired_targets(scenario)
    return lines


def paired_targets(scenario: Mapping[str, Any]) -> list[str]:
    """Protocol v2's targets, from the paired intervals against C2A: a lead over the best personalised baseline (by
    its test mean, the choice that favours the baselines) on the personalised mean, and over FedAvg-LoRA on global
    accuracy. PASS only where the interval excludes zero above; FAIL names what it is instead (no claim, a loss, too
    few seeds); MISSING where a side has no final runs."""
    rows, paired = scenario["methods"], scenario.get("paired_vs_c2a", {})
    name = f"{scenario['scenario']} alpha={fmt_number(scenario['alpha'])}"
    if "c2a" not in rows:
        return []
    present = [
        m for m in PERSONALISED_BASELINES if m in rows and rows[m]["personalized_mean_accuracy"]["mean"] is not None
    ]
    missing = [m for m in PERSONALISED_BASELINES if m not in present]
    lines = []
    if present:
        best = max(present, key=lambda m: rows[m]["personalized_mean_accuracy"]["mean"])
        lines.append(
            _paired_line(
                name, paired.get(best, {}).get("personalized_mean_accuracy"), "personalised mean", best,
                f" [personalised baselines compared: {', '.join(present)}"
                + (f"; MISSING {', '.join(missing)}]" if missing else "]"),
            )
        )  # fmt: skip
    else:
        lines.append(f"MISSING: {name}: no personalised baseline ({', '.join(PERSONALISED_BASELINES)}) final runs")
    lines.append(_paired_line(name, paired.get("lora", {}).get("global_accuracy"), "global accuracy", "lora", ""))
    return lines


def _paired_line(name: str, cell: Optional[Mapping[str, Any]], score: str, against: str, note: str) -> str:
    if cell is None:
        return f"MISSING: {name}: no paired C2A and {against} final runs for the {score}"
    verdict = "PASS" if cell["verdict"] == "lead" else "FAIL"
    interval = "" if cell["interval"] is None else " [{:+.4f}, {:+.4f}]".format(*cell["interval"])
    return (
        f"{verdict}: {name}: C2A minus {against}, {score}: {cell['mean']:+.4f}{interval} over seeds "
        f"{','.join(map(str, cell['seeds']))} ({cell['verdict']}; a pass needs a lead){note}"
    )


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
    fewest = c2a.get("min_global_predicted_classes")
    if fewest is None:
        lines.append(f"MISSING: {name}: no record of the classes C2A's global model predicted per round")
    else:
        verdict = "PASS" if fewest >= 2 else "FAIL"
        lines.append(
            f"{verdict}: {name}: no collapsed round: C2A's global model predicted >= {fewest} classes in every "
            f"evaluated round of every final seed (target >= 2)"
        )
    return lines


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
                "criterion": f"lr selection: {selection_rule(settings)} (validation carved from each client's "
                "training data), "
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
                f"{pm(row['personalized_mean_accuracy'])}  worst {pm(row['personalized_worst_accuracy'])}  "
                f"global {pm(row['global_accuracy'])}  bytes/round {pm(row['bytes_up_per_client_per_round'], 0)}"
            )
    print()
    for line in summary["targets"]:
        print(line)
    print(f"\nwrote {output_dir / 'summary.json'}, summary.csv, summary.md and {len(plots)} plots in plots/")
    return summary
