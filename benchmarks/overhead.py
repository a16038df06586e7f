"""Overhead of C2A against a frozen-body head, plain bottleneck adapters and LoRA, on the packaged MiniLM.

All four methods train on the SAME batch (BBC News articles, tokenized with MiniLM's tokenizer, truncated/padded to
`--seq_len` tokens; C2A additionally gets one random label distribution per example):

    head        only the classifier trains (the whole body is frozen)
    bottleneck  plain bottleneck adapters, r=16 (`peft_c2a.BottleneckAdapterConfig`)
    c2a         C2A, r=16 (`peft_c2a.C2AConfig`, num_labels=5)
    lora        LoRA r=8, alpha 16, on query/value (`peft.LoraConfig`)

What is measured:

- step time: one training step = forward + backward + AdamW `step()` + `zero_grad()`. All models live in one process
  and are stepped round-robin, one step per method per round, with the order rotated every round, so slow phases of
  the (noisy, shared) CPU hit every method alike. Median and IQR over `--steps` timed rounds after `--warmup` rounds.
- peak memory: each method runs in a fresh subprocess. After the model is loaded and wrapped, the optimizer created
  and the batch loaded, the process's RSS is the baseline and the kernel's peak-RSS mark is reset (`echo 5 >
  /proc/self/clear_refs`, so loading transients cannot hide the training peak). Then `--mem_steps` training steps run
  (the first allocates AdamW's state) and peak = VmHWM - baseline (VmHWM is the peak RSS that `ru_maxrss` also
  reports, read from /proc/self/status because a child forked from a large parent inherits the parent's size as its
  `ru_maxrss` floor). Repeated `--mem_repeats` times (fresh process each, methods interleaved); median and IQR.
- saved activations: bytes of the tensors autograd saves for backward during one training forward (deduplicated by
  storage, parameters excluded). Deterministic, so it explains memory differences without the RSS noise.
- trainable parameters (without and with the classifier head) and bytes a client uploads per federated round: the
  trainable tensors in float32.
- BERT-base shape (random init, 12 x 768, num_labels=5): trainable non-head parameters of C2A r=16, bottleneck r=16
  and LoRA r=8.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py                  # full run, 4-8 minutes on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py --steps 3 --warmup 1 --mem_repeats 1   # smoke test

Noise: `--threads` defaults to all cores. When other processes compete for those cores, every parallel op can stall on
a preempted OpenMP worker, which penalises methods that dispatch many small ops (C2A does, see docs/benchmarks.md);
compare with `--threads 1` on a busy machine. `--malloc_mmap_threshold 131072` removes most of glibc's heap retention
from the peak-RSS numbers (run it with `--steps 0` to measure memory only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.support` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.support.machine import (  # noqa: E402
    environment,
    median_iqr,
    parameter_counts,
    peak_rss_during,
)
from benchmarks.support.overhead_report import check_targets, markdown_table  # noqa: E402

METHODS = ("head", "bottleneck", "c2a", "lora")
NUM_LABELS = 5


# ---------------------------------------------------------------------------------------------------- models and data
def build_model(method: str, base: nn.Module | None = None) -> nn.Module:
    """The MiniLM classifier (or `base`) prepared for `method` by `peft_c2a.recipes.apply_adapter`, in train mode."""
    from transformers import AutoModelForSequenceClassification

    from peft_c2a.assets import minilm_path
    from peft_c2a.recipes import AdapterArguments, apply_adapter

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    if base is None:
        torch.manual_seed(0)  # same classifier initialisation for every method
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=NUM_LABELS)
    return apply_adapter(base, AdapterArguments(peft_method=method), NUM_LABELS, seed=0).train()


def make_batch(batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """`batch_size` random BBC News training articles, tokenized to exactly `seq_len` tokens, plus a random label
    distribution per example (rows sum to one) for C2A."""
    from transformers import AutoTokenizer

    from peft_c2a.assets import load_bbc_news, minilm_path

    train = load_bbc_news(seed=seed)["train"]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train), generator=generator)[:batch_size].tolist()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoded = tokenizer(
        [train[i]["text"] for i in rows], truncation=True, padding="max_length", max_length=seq_len, return_tensors="pt"
    )
    gamma = torch.distributions.Gamma(torch.full((NUM_LABELS,), 0.5), torch.ones(NUM_LABELS))
    torch.manual_seed(seed)
    dist = gamma.sample((batch_size,))
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "token_type_ids": encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"])),
        "labels": torch.tensor([train[i]["label"] for i in rows]),
        "label_distribution": dist / dist.sum(dim=-1, keepdim=True),
    }


def model_inputs(method: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward keyword arguments for `method` (only C2A takes the client descriptor)."""
    return {k: v for k, v in batch.items() if k != "label_distribution" or method == "c2a"}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> None:
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- measurements
def saved_activation_bytes(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during one training forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    del loss
    return total


def memory_worker(method: str, batch_path: str, steps: int, threads: int) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS increase of `steps` training steps over the RSS after set-up."""
    torch.set_num_threads(threads)
    import peft_c2a  # noqa: F401  (registers the C2A / BOTTLENECK peft types)

    batch = torch.load(batch_path)
    model = build_model(method)
    optimizer = make_optimizer(model)
    inputs = model_inputs(method, batch)
    # VmHWM is the peak RSS of this process's memory map since the reset. `ru_maxrss` would be the same number in a
    # process started from a small one, but a child forked from a big Python process inherits the parent's RSS at
    # fork as its `ru_maxrss` floor (kernel: signal->maxrss set at exec), which hides the training peak.
    measured = peak_rss_during(lambda: [train_step(model, optimizer, inputs) for _ in range(steps)])
    return measured | {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_memory(methods: list[str], batch_path: str, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for rep in range(args.mem_repeats):
        order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
        for method in order:
            command = [
                sys.executable,
                __file__,
                "--_memory_worker",
                method,
                "--_batch",
                batch_path,
                "--mem_steps",
                str(args.mem_steps),
                "--threads",
                str(args.threads),
            ]
            env = dict(os.environ)
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {method} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[method].append(result)
            print(
                f"  memory {method:<10} rep {rep + 1}: +{result['peak_increase_mb']:.1f} MB "
                f"(baseline RSS {result['baseline_rss_mb']:.0f} MB)",
                flush=True,
            )
    return results


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a wall-clock interval covers the step's work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(
    models: dict[str, nn.Module], inputs: dict[str, dict[str, torch.Tensor]], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Round-robin training steps, one per method per round, rotating the order every round."""
    methods = list(models)
    optimizers = {m: make_optimizer(models[m]) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    device = next(iter(models.values())).device
    for round_index in range(warmup + steps):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            synchronize(device)
            start = time.perf_counter()
            train_step(models[method], optimizers[method], inputs[method])
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[method].append(elapsed)
        if round_index == warmup - 1 or round_index == warmup + steps - 1 or (round_index - warmup + 1) % 5 == 0:
            label = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{steps}"
            print(f"  {label} done", flush=True)
    return times


def cuda_peak_memory(
    models: dict[str, nn.Module], inputs: dict[str, dict[str, torch.Tensor]], steps: int
) -> dict[str, float]:
    """Per method, the peak CUDA memory allocated during `steps` training steps above what was allocated before
    them (the models of all methods, their batches): activations, gradients and optimizer state, in MiB."""
    peaks = {}
    for method, model in models.items():
        optimizer = make_optimizer(model)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            train_step(model, optimizer, inputs[method])
        torch.cuda.synchronize()
        peaks[method] = (torch.cuda.max_memory_allocated() - before) / 2**20
        del optimizer
    return peaks


def profile_steps(models: dict[str, nn.Module], inputs: dict[str, dict[str, torch.Tensor]], top: int) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) of two training steps per method."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for method, model in models.items():
        optimizer = make_optimizer(model)
        train_step(model, optimizer, inputs[method])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(2):
                train_step(model, optimizer, inputs[method])
        tables[method] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return tables


def bert_base_counts() -> dict[str, dict[str, int]]:
    """Trainable parameters of each method on a randomly initialised BERT-base-shaped classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=NUM_LABELS
    )
    counts = {}
    for method in METHODS:
        torch.manual_seed(0)
        counts[method] = parameter_counts(build_model(method, base=BertForSequenceClassification(config)))
    return counts


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per method (0: skip timing)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per method")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--output", default="benchmarks/results/overhead.json", help="where to write the JSON report")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--mem_repeats", type=int, default=3, help="fresh processes per method for peak memory")
    parser.add_argument("--mem_steps", type=int, default=3, help="training steps per memory process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the memory subprocesses (a fixed threshold makes freed blocks "
        "above it go back to the OS at once, so peak RSS tracks live tensors instead of allocator retention)",
    )
    parser.add_argument("--skip_bert_base", action="store_true", help="skip the BERT-base parameter counts")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models train (`cuda` on a GPU machine: timing synchronises, and peak memory is CUDA's "
        "allocator peak measured in-process instead of the subprocesses' RSS)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print torch.profiler's top-N ops (self CPU time) for each method",
    )
    parser.add_argument("--_memory_worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory_worker:
        print(json.dumps(memory_worker(args._memory_worker, args._batch, args.mem_steps, args.threads)))
        return 0

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    import peft_c2a  # noqa: F401  (registers the C2A / BOTTLENECK peft types)

    methods = list(dict.fromkeys(args.methods))
    env = environment(args.threads)
    print(
        f"C2A overhead benchmark: {env['cpu_model']}, {env['cpu_count']} CPUs, {args.threads} threads, "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}",
        flush=True,
    )
    print(
        f"peft_c2a from {env['peft_c2a_path']} (sources sha256 {env['peft_c2a_sources_sha256'][:12]}, "
        f"repo HEAD {env['repo_head'][:10]}); load average {env['load_average']}",
        flush=True,
    )
    batch = make_batch(args.batch_size, args.seq_len, args.seed)
    tokens = int(batch["attention_mask"].sum())
    print(f"batch: {tuple(batch['input_ids'].shape)} tokens, {tokens} non-padding", flush=True)

    device = torch.device(args.device)
    models = {m: build_model(m).to(device) for m in methods}
    inputs = {m: {k: v.to(device) for k, v in model_inputs(m, batch).items()} for m in methods}
    rows: dict[str, dict[str, Any]] = {m: parameter_counts(models[m]) for m in methods}
    for method in methods:
        rows[method]["saved_activation_mb"] = saved_activation_bytes(models[method], inputs[method]) / 2**20

    times: dict[str, list[float]] = {}
    if args.steps > 0:
        print(f"timing: {args.warmup} warm-up + {args.steps} timed rounds, methods round-robin", flush=True)
        times = measure_time(models, inputs, args.steps, args.warmup)
        for method in methods:
            rows[method]["step_time_s"] = median_iqr(times[method])
            rows[method]["step_times_s"] = times[method]

    if device.type == "cuda" and not args.skip_memory:
        for method, peak in cuda_peak_memory(models, inputs, args.mem_steps).items():
            rows[method]["peak_memory_mb"] = median_iqr([peak])

    if args.profile:
        for method, table in profile_steps(models, inputs, args.profile).items():
            print(f"\n### torch.profiler, {method}: 2 training steps, top {args.profile} ops by self CPU time\n{table}")
    del models
    gc.collect()

    if not args.skip_memory and device.type != "cuda":
        print(f"peak memory: {args.mem_repeats} fresh process(es) per method, {args.mem_steps} steps each", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            batch_path = str(Path(tmp) / "batch.pt")
            torch.save(batch, batch_path)
            memory = measure_memory(methods, batch_path, args)
        for method in methods:
            rows[method]["peak_memory_mb"] = median_iqr([r["peak_increase_mb"] for r in memory[method]])
            rows[method]["peak_memory_runs"] = memory[method]

    ratios: dict[str, float] = {}
    if {"c2a", "bottleneck"} <= set(methods):
        c2a, bottleneck = rows["c2a"], rows["bottleneck"]
        if times:
            ratios["c2a_over_bottleneck_step_time"] = c2a["step_time_s"]["median"] / bottleneck["step_time_s"]["median"]
            # paired: per-round ratio (the two steps of a round ran back to back), then the median
            paired = [a / b for a, b in zip(times["c2a"], times["bottleneck"], strict=True)]
            ratios["c2a_over_bottleneck_step_time_paired_median"] = statistics.median(paired)
        if "peak_memory_mb" in c2a:
            ratios["c2a_over_bottleneck_peak_memory"] = (
                c2a["peak_memory_mb"]["median"] / bottleneck["peak_memory_mb"]["median"]
            )
        ratios["c2a_over_bottleneck_saved_activations"] = c2a["saved_activation_mb"] / bottleneck["saved_activation_mb"]
    if {"c2a", "lora"} <= set(methods):
        ratios["c2a_over_lora_upload_bytes"] = (
            rows["c2a"]["upload_bytes_with_head"] / rows["lora"]["upload_bytes_with_head"]
        )
        ratios["c2a_over_lora_upload_bytes_no_head"] = (
            rows["c2a"]["upload_bytes_no_head"] / rows["lora"]["upload_bytes_no_head"]
        )

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env,
        "settings": {
            "model": "all-MiniLM-L6-v2 (peft_c2a.assets.minilm_path()), num_labels=5",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "mem_repeats": args.mem_repeats,
            "mem_steps": args.mem_steps,
            "threads": args.threads,
            "device": str(device),
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "optimizer": "AdamW lr=1e-3 over trainable parameters",
            "memory_method": "CUDA allocator peak during mem_steps steps minus the memory allocated before them"
            if device.type == "cuda"
            else "fresh subprocess per method; peak RSS (VmHWM, reset via /proc/self/clear_refs after "
            "set-up) minus the RSS after set-up (model loaded and wrapped, optimizer built, batch loaded)",
        },
        "methods": rows,
        "ratios": ratios,
    }
    if not args.skip_bert_base:
        report["bert_base"] = bert_base_counts()
    report["verdicts"] = check_targets(report)
    report["wall_time_s"] = time.perf_counter() - wall_start
    report["environment"]["load_average_at_end"] = os.getloadavg()

    print("\n" + markdown_table(report) + "\n")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if "bert_base" in report:
        print("\nBERT-base shape (12 x 768, num_labels=5), trainable parameters:")
        for method, counts in report["bert_base"].items():
            print(
                f"  {method:<10} no head {counts['trainable_params_no_head']:>9,}   "
                f"with head {counts['trainable_params_with_head']:>9,}"
            )
    print()
    for line in report["verdicts"]:
        print(line)
    print(f"\nwall time {report['wall_time_s']:.0f} s")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
