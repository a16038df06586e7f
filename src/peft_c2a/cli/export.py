"""`peft-c2a export`: write one client's C2A adapter as a static adapter (bottleneck, or LoRA for C2A-LoRA).

    peft-c2a export ADAPTER_DIR --label-counts 120,3,40,0,7 --out DIR
    peft-c2a export ADAPTER_DIR --label-counts 5,5 --client-id 3 --out DIR --base-model path/or/hub-id

The C2A adapter is loaded onto its base model (the `base_model_name_or_path` it was saved with, or `--base-model`),
the client's adapter is generated once from its label counts (and client id, for adapters with `num_clients`), and
`DIR` receives a plain PEFT adapter folder: `BOTTLENECK` (load it after `import peft_c2a`) or `LORA` (loads with
vanilla PEFT and merges with `merge_and_unload()`). Exact for adapters trained with `use_context=False`; others are
refused (see `peft_c2a.export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

# the transformers class that builds the base model of each PEFT task type
AUTO_CLASS_BY_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def parse_counts(text: str) -> list[float]:
    """`"120,3,40"` -> `[120.0, 3.0, 40.0]`, with a message that says what is wrong otherwise."""
    try:
        counts = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 120,3,40; got {text!r}") from None
    return counts


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Export one client's C2A adapter as a static PEFT adapter folder."
    )
    parser.add_argument("adapter_dir", type=Path, help="a saved C2A adapter (adapter_config.json + weights)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the static adapter to")
    parser.add_argument(
        "--label-counts",
        type=parse_counts,
        default=None,
        help="the client's training examples per class, comma-separated (omit: the unknown client, uniform)",
    )
    parser.add_argument("--client-id", type=int, default=None, help="the client's id, for adapters with num_clients")
    parser.add_argument("--base-model", default=None, help="base model path or Hub id (default: the adapter's own)")
    parser.add_argument("--adapter-name", default="default", help="the adapter's name inside the model")
    return parser


def run(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Path:
    args = build_parser(prog).parse_args(argv)
    config_file = args.adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{args.adapter_dir} is not a saved adapter: it has no adapter_config.json.")
    saved = json.loads(config_file.read_text())
    if saved.get("peft_type") != "C2A":
        raise ValueError(f"{args.adapter_dir} holds a {saved.get('peft_type')} adapter, not a C2A one.")
    import transformers
    from peft import PeftModel

    import peft_c2a  # noqa: F401  (registers the C2A type with PEFT)

    task = saved.get("task_type") or "FEATURE_EXTRACTION"
    if task not in AUTO_CLASS_BY_TASK:
        raise ValueError(f"Cannot build a base model for task type {task!r}; known: {sorted(AUTO_CLASS_BY_TASK)}.")
    base_name = args.base_model or saved.get("base_model_name_or_path")
    if not base_name:
        raise ValueError("The adapter does not name its base model: pass --base-model.")
    auto_class = getattr(transformers, AUTO_CLASS_BY_TASK[task])
    base = auto_class.from_pretrained(base_name)
    model = PeftModel.from_pretrained(base, args.adapter_dir, adapter_name=args.adapter_name).eval()
    return model.export_adapter(
        args.out, label_distribution=args.label_counts, client_ids=args.client_id, adapter_name=args.adapter_name
    )


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """The console command (`peft-c2a export`): bad input is reported as one line, not a traceback."""
    try:
        folder = run(argv, prog)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    kind = json.loads((folder / "adapter_config.json").read_text())["peft_type"]
    print(f"wrote a {kind} adapter to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
