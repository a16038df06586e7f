"""Update-size calibration: does a C2A adapter move its hidden states as far as a plain bottleneck adapter at the same
learning rate?

For each learning rate and seed, a C2A model and a plain bottleneck model (same backbone, same sites, same r) take
the same Adam steps on the same BBC News batches; after each step `peft_c2a.diagnostics.adapter_output_shift` measures
`||adapter delta|| / ||hidden state||` on a fixed probe batch (mean over sites). The ratio C2A / bottleneck after 1 and
after 5 steps is the calibration figure (the C2A v2 target: 0.8-1.25 at lr 1e-3, 3e-3 and 1e-2). The script also
records the mean cosine of the hypernetwork's generator rows after the last step (0: distinct basis adapters, 1:
collapsed) and the relative shift of the last hidden state.

`--family lora` makes the same comparison for C2A-LoRA (the hypernetwork generates LoRA factors of rank `--lora_r`
on query/value, alpha 2 r, no context term: the exportable variant) against PEFT's plain LoRA of the same shape;
the shift is then `||scaling * B A x|| / ||W x||` at each projection.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibration.py                      # MiniLM, 6 layers, 3 seeds
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibration.py --num_layers 2 --seeds 0
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibration.py --family lora        # C2A-LoRA against LoRA

Writes `benchmarks/results/calibration/calibration-<layers>l.json` (`calibration-lora-<layers>l.json` for the LoRA
family) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "calibration"
DESCRIPTOR = [0.6, 0.05, 0.2, 0.1, 0.05]  # a skewed client over BBC News's 5 classes
# per family: the C2A variant and the plain adapter it is calibrated against
FAMILIES = {"bottleneck": ("c2a", "bottleneck"), "lora": ("c2a_lora", "lora")}


def bbc_batches(tokenizer: Any, count: int, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """`count` batches of BBC News training articles with labels, drawn by `seed`."""
    from peft_c2a.assets import load_bbc_news

    data = load_bbc_news()["train"]
    rows = np.random.default_rng(seed).choice(len(data), size=count * batch_size, replace=False)
    batches = []
    for start in range(0, len(rows), batch_size):
        picked = data.select(rows[start : start + batch_size].tolist())
        encoded = tokenizer(
            list(picked["text"]), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor(list(picked["label"]))
        batches.append(dict(encoded))
    return batches


def build(method: str, num_layers: int, bottleneck_dim: int, seed: int, lora_r: int = 8) -> torch.nn.Module:
    """Packaged MiniLM (first `num_layers` layers) with C2A, C2A-LoRA, a plain bottleneck adapter or LoRA, seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import peft_c2a
    from peft_c2a.assets import minilm_path

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=len(DESCRIPTOR), num_hidden_layers=num_layers
    )
    if method == "c2a":
        config = peft_c2a.C2AConfig(
            task_type="SEQ_CLS", num_labels=len(DESCRIPTOR), bottleneck_dim=bottleneck_dim, init_seed=seed
        )
    elif method == "c2a_lora":
        config = peft_c2a.C2AConfig(
            task_type="SEQ_CLS",
            num_labels=len(DESCRIPTOR),
            adapter_kind="lora",
            bottleneck_dim=lora_r,
            lora_alpha=2.0 * lora_r,
            use_context=False,
            init_seed=seed,
        )
    elif method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=lora_r, lora_alpha=2 * lora_r)
    else:
        config = peft_c2a.BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=bottleneck_dim)
    return get_peft_model(base, config)


def measure(method: str, lr: float, seed: int, args: argparse.Namespace, batches: list[dict]) -> dict[str, Any]:
    from peft_c2a.diagnostics import adapter_shift_during_training, hidden_state_shift, last_hidden_state

    model = build(method, args.num_layers, args.bottleneck_dim, seed, args.lora_r)
    generated = method.startswith("c2a")
    descriptor = {"label_distribution": DESCRIPTOR} if generated else {}
    probe = {key: value for key, value in batches[0].items() if key != "labels"}
    model.eval()
    start = last_hidden_state(model, probe, **descriptor)
    shifts = adapter_shift_during_training(model, batches, lr, args.steps, probe, **descriptor)
    result = {
        "adapter_shift": shifts,
        "last_hidden_shift": hidden_state_shift(start, last_hidden_state(model, probe, **descriptor)),
    }
    if generated:
        result["generator_row_cosine"] = model.base_model.c2a_hypernet["default"].generator_row_cosine()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num_layers", type=int, default=6, help="MiniLM layers kept (6: the whole model)")
    parser.add_argument("--bottleneck_dim", type=int, default=16)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="bottleneck")
    parser.add_argument("--lora_r", type=int, default=8, help="rank of both LoRA models (--family lora)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from peft_c2a.assets import minilm_path

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    runs = []
    generated, reference = FAMILIES[args.family]  # the run records keep "c2a" for the generated model of either family
    for seed in args.seeds:
        batches = bbc_batches(tokenizer, args.steps, args.batch_size, args.max_length, seed)
        for lr in args.lrs:
            c2a, plain = (measure(method, lr, seed, args, batches) for method in (generated, reference))
            ratios = [c / b for c, b in zip(c2a["adapter_shift"], plain["adapter_shift"], strict=True)]
            runs.append({"lr": lr, "seed": seed, "c2a": c2a, reference: plain, "ratio": ratios})
            print(
                f"lr {lr:g} seed {seed}: {generated} / {reference} adapter shift after 1 step {ratios[0]:.2f}, after "
                f"{args.steps} {ratios[-1]:.2f}; generator row cosine {c2a['generator_row_cosine']}",
                flush=True,
            )
    summary = {}
    for lr in args.lrs:
        chosen = [run for run in runs if run["lr"] == lr]
        summary[f"{lr:g}"] = {
            "ratio_step_1": float(np.mean([run["ratio"][0] for run in chosen])),
            f"ratio_step_{args.steps}": float(np.mean([run["ratio"][-1] for run in chosen])),
            "ratio_step_1_per_seed": [run["ratio"][0] for run in chosen],
            f"ratio_step_{args.steps}_per_seed": [run["ratio"][-1] for run in chosen],
            "last_hidden_ratio": float(
                np.mean([run["c2a"]["last_hidden_shift"] / run[reference]["last_hidden_shift"] for run in chosen])
            ),
        }
        print(
            f"lr {lr:g}: mean ratio after 1 step {summary[f'{lr:g}']['ratio_step_1']:.2f}, after {args.steps} "
            f"{summary[f'{lr:g}'][f'ratio_step_{args.steps}']:.2f}"
        )
    sys.path.insert(0, str(ROOT))
    from benchmarks.federated_bench.protocol import atomic_write_json
    from benchmarks.support.machine import environment

    document = {"settings": vars(args), "environment": environment(args.threads), "summary": summary, "runs": runs}
    family = "" if args.family == "bottleneck" else f"{args.family}-"
    path = Path(args.output_dir) / f"calibration-{family}{args.num_layers}l.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, document)
    print(f"wrote {path}")
    return document


if __name__ == "__main__":
    main()
