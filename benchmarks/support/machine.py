"""What machine and which code a benchmark ran on, and what a process costs: the helpers every benchmark shares.

- `environment`: the hardware, software versions and provenance recorded in every result file.
- `status_kb` / `reset_peak_rss` / `peak_rss_during`: a process's resident memory and its peak, from
  `/proc/self/status`.
- `parameter_counts`: trainable parameters (with and without the classifier head) and the bytes a client uploads.
- `median_iqr`: how every timing and memory series is summarised (median and inter-quartile range).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's model name from `lscpu` ("Model name"), else `platform.processor()`, else ""."""
    cpu = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return cpu
    return next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), cpu)


def cpu_has_bf16() -> Optional[bool]:
    """Whether this CPU has bf16 instructions (`avx512_bf16` or `amx_bf16` among /proc/cpuinfo's flags; `None` where
    there is no such file). oneDNN's own check also passes on AVX-512 CPUs that only emulate bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def environment(threads: Optional[int] = None) -> dict[str, Any]:
    """Hardware, software versions and provenance of this process: which `peft_c2a` was measured (its folder, a
    digest of its sources, the repository's HEAD), on what, and how busy the machine was."""
    import datasets
    import numpy as np
    import peft
    import torch
    import transformers

    import peft_c2a

    package = Path(peft_c2a.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        head = ""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # bf16 runs are fast only on CPUs with bf16 instructions (elsewhere oneDNN emulates them)
        "cpu_bf16": cpu_has_bf16(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "peft_c2a_path": str(package),
        "peft_c2a_sources_sha256": digest.hexdigest(),
        "repo_head": head,
        "load_average": os.getloadavg(),
    }


def status_kb(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`) in kB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_during(work: Any) -> dict[str, Any]:
    """Run `work()` and measure this process's peak RSS during it above the RSS before it (garbage collected first;
    the peak mark is reset so that set-up transients cannot hide the peak). Where the kernel does not allow the reset,
    the peak is `ru_maxrss`, the process's lifetime peak (`peak_mark_reset` says which)."""
    import gc
    import resource

    gc.collect()
    baseline_kb = status_kb("VmRSS")
    reset = reset_peak_rss()
    work()
    peak_kb = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_increase_mb": (peak_kb - baseline_kb) / 1024,
        "peak_mark_reset": reset,
    }


def is_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to the classification head (`classifier`), which every method trains."""
    return "classifier" in name.split(".")


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable parameters with and without the head, what a client uploads per round (every trainable tensor as
    float32), and all parameters."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    body = [param for name, param in trainable if not is_head_parameter(name)]
    return {
        "trainable_params_no_head": sum(param.numel() for param in body),
        "trainable_params_with_head": sum(param.numel() for _, param in trainable),
        "upload_bytes_no_head": sum(param.numel() * 4 for param in body),
        "upload_bytes_with_head": sum(param.numel() * 4 for _, param in trainable),
        "total_params": sum(param.numel() for param in model.parameters()),
    }


def median_iqr(values: list[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method, so 2 values give their range) and IQR of a series; one value is its own
    quartiles. Medians, not means: a shared CPU's stalls are one-sided outliers that would drag a mean."""
    if not values:
        raise ValueError("median_iqr needs at least one value.")
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else (ordered[0],) * 3
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(ordered)}
