"""What `benchmarks/overhead.py` prints and checks: its markdown table and its PASS / FAIL lines against the targets
(C2A's step time and peak memory relative to the plain bottleneck adapter, its upload bytes against LoRA r = 8)."""

from __future__ import annotations

from typing import Any

TARGETS = {"step_time": 1.15, "peak_memory": 1.10}


def markdown_table(report: dict[str, Any]) -> str:
    header = (
        "| method | step time median (s) | step IQR (s) | peak mem (MB) | mem IQR (MB) | saved act. (MB) "
        "| trainable no head | trainable with head | upload bytes (with head) |"
    )
    lines = [header, "|" + "---|" * 9]
    for method, row in report["methods"].items():
        time_s, mem = row.get("step_time_s"), row.get("peak_memory_mb")
        cells = [
            method,
            f"{time_s['median']:.3f}" if time_s else "-",
            f"{time_s['iqr']:.3f}" if time_s else "-",
            f"{mem['median']:.1f}" if mem else "-",
            f"{mem['iqr']:.1f}" if mem else "-",
            f"{row['saved_activation_mb']:.1f}" if "saved_activation_mb" in row else "-",
            f"{row['trainable_params_no_head']:,}",
            f"{row['trainable_params_with_head']:,}",
            f"{row['upload_bytes_with_head']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(report: dict[str, Any]) -> list[str]:
    ratios, lines = report["ratios"], []
    if "c2a_over_bottleneck_step_time" in ratios:
        value = ratios["c2a_over_bottleneck_step_time"]
        verdict = "PASS" if value <= TARGETS["step_time"] else "FAIL"
        lines.append(f"{verdict}: C2A step time = {value:.3f}x bottleneck (target <= {TARGETS['step_time']:.2f}x)")
    if "c2a_over_bottleneck_peak_memory" in ratios:
        value = ratios["c2a_over_bottleneck_peak_memory"]
        verdict = "PASS" if value <= TARGETS["peak_memory"] else "FAIL"
        lines.append(f"{verdict}: C2A peak memory = {value:.3f}x bottleneck (target <= {TARGETS['peak_memory']:.2f}x)")
    if "c2a_over_lora_upload_bytes" in ratios:
        value = ratios["c2a_over_lora_upload_bytes"]
        c2a, lora = (report["methods"][m]["upload_bytes_with_head"] for m in ("c2a", "lora"))
        verdict = "PASS" if c2a < lora else "FAIL"
        lines.append(f"{verdict}: C2A upload = {c2a:,} B vs LoRA r=8 {lora:,} B ({value:.3f}x; target < 1x)")
    return lines
