"""The report's "results at a glance": per scenario, every method's headline scores beside C2A's paired lead or loss.

One table per scenario: the personalised mean, the 10th-percentile client, global accuracy and unseen clients (mean
over the final seeds), each non-C2A row with C2A's paired difference and its interval (`statistics.py`), and the
bytes a client sends per round. It is the first thing summary.md shows; the full tables follow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from .protocol import fmt_number
from .statistics import LEVEL

# (score: a row key of report.py and a paired score of statistics.py, column title)
GLANCE_SCORES = (
    ("personalized_mean_accuracy", "personalised mean"),
    ("personalized_p10_accuracy", "10th-percentile client"),
    ("global_accuracy", "global"),
    ("unseen_mean_accuracy", "unseen clients"),
)


def glance_markdown(summary: Mapping[str, Any], reference: str = "c2a") -> list[str]:
    """The glance tables (empty when no scenario has final runs)."""
    lines: list[str] = []
    for scenario in summary["scenarios"]:
        rows = {method: row for method, row in scenario["methods"].items() if row["seeds"]}
        if not rows:
            continue
        paired = scenario.get("paired_vs_c2a", {})
        lines += [
            f"**{scenario['scenario']}, alpha = {fmt_number(scenario['alpha'])}** (mean over final seeds; in brackets "
            f"{reference} minus the method, paired by seed, with its {LEVEL:.0%} bootstrap interval)",
            "",
            "| method | seeds | " + " | ".join(title for _, title in GLANCE_SCORES) + " | bytes up/client/round |",
            "|---|---|" + "---|" * (len(GLANCE_SCORES) + 1),
        ]
        for method, row in rows.items():
            cells = [
                _cell(row[score]["mean"], None if method == reference else paired.get(method, {}).get(score))
                for score, _ in GLANCE_SCORES
            ]
            sent = row["bytes_up_per_client_per_round"]["mean"]
            cells.append("–" if not sent else f"{sent:,.0f}")
            lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _cell(mean: Optional[float], difference: Optional[Mapping[str, Any]]) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.3f}"
    if difference is None:
        return text
    if difference["interval"] is None:
        return f"{text} ({difference['mean']:+.3f}, {difference['verdict']})"
    low, high = difference["interval"]
    claim = f" {difference['verdict']}" if difference["verdict"] in ("lead", "loss") else ""
    return f"{text} ({difference['mean']:+.3f} [{low:+.3f}, {high:+.3f}]{claim})"
