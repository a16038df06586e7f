"""The overhead and serving benchmarks' shared summary (`median_iqr`) and the overhead benchmark's target verdicts."""

from __future__ import annotations

import pytest

from benchmarks.support.machine import median_iqr
from benchmarks.support.overhead_report import TARGETS, check_targets, markdown_table


def test_median_iqr_by_hand():
    summary = median_iqr([4.0, 1.0, 3.0, 2.0, 100.0])
    assert summary == {"median": 3.0, "q1": 2.0, "q3": 4.0, "iqr": 2.0, "n": 5}
    assert median_iqr([7.5]) == {"median": 7.5, "q1": 7.5, "q3": 7.5, "iqr": 0.0, "n": 1}
    assert median_iqr([1.0, 3.0])["q1"] == 1.5 and median_iqr([1.0, 3.0])["q3"] == 2.5


def test_median_iqr_refuses_an_empty_series():
    with pytest.raises(ValueError, match="at least one value"):
        median_iqr([])


def report(step_ratio: float, memory_ratio: float, c2a_bytes: int, lora_bytes: int) -> dict:
    row = {"trainable_params_no_head": 10, "trainable_params_with_head": 12}
    return {
        "ratios": {
            "c2a_over_bottleneck_step_time": step_ratio,
            "c2a_over_bottleneck_peak_memory": memory_ratio,
            "c2a_over_lora_upload_bytes": c2a_bytes / lora_bytes,
        },
        "methods": {
            "c2a": {**row, "upload_bytes_with_head": c2a_bytes, "step_time_s": median_iqr([0.2, 0.3])},
            "lora": {**row, "upload_bytes_with_head": lora_bytes},
        },
    }


def test_targets_pass_at_and_fail_above_their_limits():
    verdicts = check_targets(report(TARGETS["step_time"], TARGETS["peak_memory"], 100, 200))
    assert [line.split(":")[0] for line in verdicts] == ["PASS", "PASS", "PASS"]
    verdicts = check_targets(report(TARGETS["step_time"] + 0.01, TARGETS["peak_memory"] + 0.01, 200, 200))
    assert [line.split(":")[0] for line in verdicts] == ["FAIL", "FAIL", "FAIL"]
    assert "1.160x bottleneck (target <= 1.15x)" in verdicts[0]


def test_markdown_table_marks_what_was_not_measured():
    lines = markdown_table(report(1.0, 1.0, 100, 200)).splitlines()
    assert len(lines) == 4  # header, rule, one row per method
    assert lines[2].startswith("| c2a | 0.250 | 0.050 | - | - | - | 10 | 12 | 100 |")
    assert lines[3].startswith("| lora | - | - | - |")
