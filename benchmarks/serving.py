"""Serving a personalised adapter: inference latency and memory of C2A against its exported forms, on the packaged
MiniLM classifier (5 labels).

    base            the base classifier, no adapter
    c2a             C2A as trained by default (bottleneck adapters, context term on): the hypernetwork runs in every
                    forward
    c2a_static      C2A without the context term (the exportable configuration), still served through the
                    hypernetwork
    bottleneck      a plain bottleneck adapter (`BottleneckAdapterConfig`, r=16): the reference for the export
    exported        `c2a_static` exported for one client (`export_adapter`) and loaded as a BOTTLENECK adapter
    c2a_lora        C2A-LoRA (rank 8 on query/value, alpha 16, no context term), through the hypernetwork
    lora_exported   `c2a_lora` exported for one client: a plain PEFT LoRA, loaded unmerged
    lora_merged     the same LoRA merged into the base weights (`merge_and_unload()`)

Every adapter has moved from its initialisation (small random perturbations of its trainable tensors, as after
training), so the exported models compute what a trained one would; their outputs are checked against the C2A
model's they came from. What is measured:

- latency: one `torch.inference_mode()` forward of a batch of BBC News articles (`--batch_size` x `--seq_len`
  tokens); all models in one process, round-robin with the order rotated every round; median and IQR over
  `--repeats` rounds after `--warmup` rounds, for each batch size in `--batch_sizes`.
- memory: in a fresh process per model, the peak RSS increase of `--mem_forwards` forwards over the RSS after the
  model is built (VmHWM reset via /proc/self/clear_refs, as benchmarks/overhead.py does), and the bytes of the
  model's parameters and buffers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving.py --threads 1      # about 4 minutes on one core
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from benchmarks.support.machine import environment, median_iqr, peak_rss_during  # noqa: E402

MODELS = ("base", "c2a", "c2a_static", "bottleneck", "exported", "c2a_lora", "lora_exported", "lora_merged")
NUM_LABELS = 5
CLIENT_COUNTS = [120, 3, 40, 0, 7]  # the exported client's label counts
TARGETS = {"lora_merged_over_base": 1.05, "exported_over_bottleneck": 1.05}


def base_classifier() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from peft_c2a.assets import minilm_path

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=NUM_LABELS).eval()


def trained(model: nn.Module) -> nn.Module:
    """Move every trainable tensor a little, as training would (a zero-start up path would make exports trivial)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def build(name: str, scratch: Path) -> nn.Module:
    """The model `name` (see the module docstring), in eval mode."""
    from peft import PeftModel, get_peft_model

    import peft_c2a

    if name == "base":
        return base_classifier()
    if name == "bottleneck":
        return trained(get_peft_model(base_classifier(), peft_c2a.BottleneckAdapterConfig(task_type="SEQ_CLS")))
    lora = name in ("c2a_lora", "lora_exported", "lora_merged")
    kind = dict(adapter_kind="lora", bottleneck_dim=8, lora_alpha=16) if lora else {}
    use_context = name == "c2a"
    config = peft_c2a.C2AConfig(task_type="SEQ_CLS", use_context=use_context, init_seed=0, **kind)
    c2a = trained(get_peft_model(base_classifier(), config))
    if name in ("c2a", "c2a_static", "c2a_lora"):
        return c2a
    folder = c2a.export_adapter(scratch / name, label_distribution=CLIENT_COUNTS)
    exported = PeftModel.from_pretrained(base_classifier(), folder).eval()
    return exported.merge_and_unload().eval() if name == "lora_merged" else exported


def needs_descriptor(name: str) -> bool:
    return name in ("c2a", "c2a_static", "c2a_lora")


def make_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from peft_c2a.assets import load_bbc_news, minilm_path

    texts = load_bbc_news(seed=0)["train"]["text"][:batch_size]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoded = tokenizer(texts, truncation=True, padding="max_length", max_length=seq_len, return_tensors="pt")
    return {key: encoded[key] for key in ("input_ids", "attention_mask")}


def forward(model: nn.Module, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {"label_distribution": CLIENT_COUNTS} if needs_descriptor(name) else {}
    with torch.inference_mode():
        return model(**batch, **extra).logits


def check_exports(models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs logit difference of each export against the C2A model it came from."""
    pairs = {"exported": "c2a_static", "lora_exported": "c2a_lora", "lora_merged": "c2a_lora"}
    return {
        name: float((forward(models[name], name, batch) - forward(models[source], source, batch)).abs().max())
        for name, source in pairs.items()
        if name in models and source in models
    }


def measure_latency(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], repeats: int, warmup: int
) -> dict[str, list[float]]:
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            forward(models[name], name, batch)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def memory_worker(name: str, batch_size: int, seq_len: int, forwards: int, threads: int) -> dict[str, Any]:
    """In a fresh process: the peak RSS increase of `forwards` forwards over the RSS after set-up."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        model = build(name, Path(scratch))
    batch = make_batch(batch_size, seq_len)
    measured = peak_rss_during(lambda: [forward(model, name, batch) for _ in range(forwards)])
    return measured | {"model_mb": model_bytes(model) / 2**20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem_forwards", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/serving.json")
    parser.add_argument("--_memory_worker", choices=MODELS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory_worker:
        batch_size = max(args.batch_sizes)
        print(json.dumps(memory_worker(args._memory_worker, batch_size, args.seq_len, args.mem_forwards, args.threads)))
        return 0
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    import transformers

    import peft_c2a  # noqa: F401  (registers the C2A / BOTTLENECK peft types)

    transformers.logging.set_verbosity_error()
    env = environment(args.threads)
    print(f"serving benchmark: {env['cpu_model']}, {args.threads} threads, torch {env['torch']}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        models = {name: build(name, Path(scratch)) for name in args.models}
    rows: dict[str, dict[str, Any]] = {name: {"model_mb": model_bytes(model) / 2**20} for name, model in models.items()}
    report: dict[str, Any] = {"environment": env, "settings": vars(args) | {"client_counts": CLIENT_COUNTS}}
    report["export_max_abs_logit_difference"] = check_exports(models, make_batch(4, args.seq_len))
    ratios: dict[str, float] = {}
    for batch_size in args.batch_sizes:
        batch = make_batch(batch_size, args.seq_len)
        print(f"latency, batch {batch_size} x {args.seq_len}: {args.warmup} + {args.repeats} rounds", flush=True)
        times = measure_latency(models, batch, args.repeats, args.warmup)
        for name in models:
            rows[name][f"latency_ms_batch{batch_size}"] = median_iqr([1000 * t for t in times[name]])
        median = {name: rows[name][f"latency_ms_batch{batch_size}"]["median"] for name in models}
        if "base" in median:
            for name in models:
                ratios[f"{name}_over_base_batch{batch_size}"] = median[name] / median["base"]
        if {"exported", "bottleneck"} <= set(median):
            ratios[f"exported_over_bottleneck_batch{batch_size}"] = median["exported"] / median["bottleneck"]
    del models
    gc.collect()
    if not args.skip_memory:
        for name in args.models:
            command = [sys.executable, __file__, "--_memory_worker", name, "--threads", str(args.threads)]
            command += ["--batch_sizes", str(max(args.batch_sizes)), "--seq_len", str(args.seq_len)]
            command += ["--mem_forwards", str(args.mem_forwards)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {name} failed:\n{done.stderr[-4000:]}")
            rows[name]["memory"] = json.loads(done.stdout.strip().splitlines()[-1])
    report["models"], report["ratios"] = rows, ratios
    verdicts = []
    for batch_size in args.batch_sizes:
        for key, limit in TARGETS.items():
            value = ratios.get(f"{key}_batch{batch_size}")
            if value is not None:
                verdict = "PASS" if value <= limit else "FAIL"
                verdicts.append(f"{verdict}: {key} at batch {batch_size} = {value:.3f} (target <= {limit})")
    report["verdicts"] = verdicts
    report["wall_time_s"] = time.perf_counter() - wall_start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")

    header = "| model | " + " | ".join(f"latency ms, batch {b} (median [IQR])" for b in args.batch_sizes)
    print("\n" + header + " | ×base | params+buffers MB | peak RSS increase MB |")
    print("|---" * (len(args.batch_sizes) + 4) + "|")
    for name, row in rows.items():
        cells = []
        for batch_size in args.batch_sizes:
            stats = row[f"latency_ms_batch{batch_size}"]
            cells.append(f"{stats['median']:.2f} [{stats['q1']:.2f}, {stats['q3']:.2f}]")
        last = max(args.batch_sizes)
        over = ratios.get(f"{name}_over_base_batch{last}")
        memory = row.get("memory", {}).get("peak_increase_mb")
        print(
            f"| {name} | " + " | ".join(cells) + f" | {over:.3f} |" if over is not None else " | – |",
            f"{row['model_mb']:.1f} | {memory:.1f} |" if memory is not None else f"{row['model_mb']:.1f} | – |",
        )
    print("\nexport max |logit difference|:", report["export_max_abs_logit_difference"])
    print("\n".join(verdicts))
    print(f"wrote {args.output} in {report['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
