"""The federated benchmark's summary as text and pictures: the markdown tables (summary.md), the CSV and the plots.

`report.py` aggregates run files into a summary; this module only renders one.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .glance import glance_markdown
from .protocol import (
    _FILE_MODE,
    GRID_EXTENSIONS,
    METHODS,
    TAIL_ROUNDS,
    atomic_write_text,
    fmt_number,
)
from .statistics import paired_markdown


def pm(stat: Mapping[str, Any], digits: int = 3) -> str:
    """`mean ± std` (just the mean for one value, `–` for none); thousands separators for whole numbers."""
    if stat.get("mean") is None:
        return "–"
    spec = f",.{digits}f" if digits == 0 else f".{digits}f"
    text = format(stat["mean"], spec)
    if stat.get("std") is not None:
        text += " ± " + format(stat["std"], spec)
    return text


def _rounds_cell(row: Mapping[str, Any]) -> str:
    if not row["seeds"]:
        return "–"  # no final runs yet: nothing was measured, so nothing was "not reached"
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
    "10th-percentile client",
    "example-weighted personalised",
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
        "its own descriptor (`local`: its own model); *worst*: the lowest client; *10th-percentile client*: the "
        "clients' 10th percentile (linear interpolation), steadier than the worst where clients have few test "
        "examples; *example-weighted*: all clients' test examples pooled; *unseen*: held-out clients with "
        "their own descriptors; *global*: the whole test set, no descriptor (C2A: uniform). `local` has no global "
        "model, so no global or unseen figures. *Rounds to 95%*: first round at which the seed-mean personalised "
        "mean accuracy reaches 95% of the best final personalised mean accuracy among C2A and the baselines "
        "(centralized, an upper bound, excluded), with each seed's round. *Step time*: median over rounds of the "
        "history's train_time / local_steps, relative to the plain bottleneck (noisy on a shared CPU). *Peak RSS*: "
        "the worker process's VmHWM during training + evaluation (the model and data included); on a GPU, in brackets, "
        "torch's peak allocated device memory.\n\n"
    )
    glance = glance_markdown(summary)
    if glance:
        out.write("## Results at a glance\n\n" + "\n".join(glance) + "\n")
    if settings:
        out.write("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".\n\n")
    for scenario in summary["scenarios"]:
        rows = scenario["methods"]
        out.write(f"## {scenario['scenario']}, alpha = {fmt_number(scenario['alpha'])}\n\n")
        if scenario["hardware"]:
            out.write("Final runs on: " + "; ".join(scenario["hardware"]) + ".\n\n")
        if scenario.get("budget"):
            out.write(budget_line(scenario["budget"]) + "\n\n")
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
                pm(row["global_accuracy"]),
                pm(row["personalized_mean_accuracy"]),
                pm(row["personalized_worst_accuracy"]),
                pm(row["personalized_p10_accuracy"]),
                pm(row["personalized_weighted_accuracy"]),
                pm(row["unseen_mean_accuracy"]),
                " / ".join(
                    pm(row[key])
                    for key in (
                        "global_accuracy_tail",
                        "personalized_mean_accuracy_tail",
                        "personalized_worst_accuracy_tail",
                    )
                ),
                _rounds_cell(row),
                pm(row["bytes_up_per_client_per_round"], 0),
                params,
                f"{ratio:.2f}" if ratio is not None else "–",
                pm(row["peak_rss_mb"], 0)
                + (f" (GPU {pm(row['cuda_peak_allocated_mb'], 0)})" if row["cuda_peak_allocated_mb"]["n"] else ""),
                pm(row["wall_time_s"], 0),
            ]
            out.write("| " + " | ".join(cells) + " |\n")
        paired = paired_markdown(scenario.get("paired_vs_c2a", {}))
        if paired:
            out.write("\n" + "\n".join(paired))
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
            f"{m}: the chosen lr {fmt_number(r['chosen_lr'])} is at the edge of the grid after {GRID_EXTENSIONS} "
            "extensions: the best lr may lie beyond"
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
    out.write("## Targets\n\n```\n" + "\n".join(summary["targets"]) + "\n```\n\n")
    out.write("Methods:\n\n" + "".join(f"- `{m}`: {spec.description}\n" for m, spec in METHODS.items()))
    return out.getvalue()


def budget_line(record: Mapping[str, Any]) -> str:
    """What the budget probes decided, in one line (budget.py's rule)."""
    plateaus = ", ".join(
        f"{method} {'–' if value is None else f'round {value}'}"
        + (" (best window is the probe's last: still rising)" if record["best_window_is_last"].get(method) else "")
        for method, value in record["plateau_rounds"].items()
    )
    if "num_rounds" in record:
        decision = f"**{record['num_rounds']} rounds**"
    else:
        decision = f"undecided (missing probes {record['missing']}, failed {record['failed']})"
    return f"Budget: {decision}; plateau of the probes: {plateaus or '–'}. Rule: {record['rule']}."


def _all_lrs(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({lr for row in rows.values() for lr in row["selection_scores"]}, key=float)


CSV_STATS = (
    "global_accuracy",
    "personalized_mean_accuracy",
    "personalized_worst_accuracy",
    "personalized_p10_accuracy",
    "personalized_weighted_accuracy",
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
        if not any(row["seeds"] for row in rows.values()):
            continue  # only select runs so far: nothing to plot (and no empty figure to mistake for a result)
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
