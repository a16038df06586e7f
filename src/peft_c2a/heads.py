"""Classification heads: finding the one that outputs the class scores, its class names, and sizing it to the
classes a saved adapter was trained for.

A C2A classifier's label term and logit adjustment are over `num_labels` classes, and PEFT saves the task head
(`classifier`, `score`, ...) with the adapter (`modules_to_save`). Loading such an adapter onto a base model that has a
head of another size (a sentence encoder's default 2 labels, say) would fail on the size mismatch unless the user
knew to pass `num_labels=`. The head's weights come from the adapter anyway, so the tuner re-creates the head's
output layer at the adapter's size before the weights are loaded; this module does that for any head layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from torch import nn


def resize_classifier_head(
    model: nn.Module, head_names: Iterable[str], num_labels: int, label_names: Optional[Sequence[str]] = None
) -> list[str]:
    """Replace the output `nn.Linear` of each head named in `head_names` (module names or their last component)
    by a fresh one with `num_labels` outputs, and update `model.config` (`num_labels`, `id2label`, `label2id`).

    The output layers are the linear layers of the head whose `out_features` is the model's current number of labels
    (the head itself for BERT's `classifier` and GPT-2's `score`, `out_proj` inside RoBERTa's). Returns the names of
    the replaced layers; nothing is changed when there are none.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "num_labels", None)
    wanted = set(head_names)
    heads = [
        (name, module) for name, module in model.named_modules() if name in wanted or name.rsplit(".", 1)[-1] in wanted
    ]
    replaced: list[str] = []
    for head_name, head in heads:
        for name, layer in list(head.named_modules()):
            if not isinstance(layer, nn.Linear) or layer.out_features != current:
                continue
            fresh = nn.Linear(layer.in_features, num_labels, bias=layer.bias is not None)
            fresh.to(device=layer.weight.device, dtype=layer.weight.dtype)
            full = f"{head_name}.{name}" if name else head_name
            parent_name, _, attribute = full.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, fresh)
            replaced.append(full)
    if replaced and config is not None:
        names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(num_labels)]
        config.num_labels = num_labels  # also rebuilds the default id2label of a PretrainedConfig
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    return replaced


def named_labels(model_config: Any, num_labels: Optional[int]) -> Optional[list[str]]:
    """The model's class names in id order, unless it has none but the default `LABEL_{i}` ones."""
    id2label = getattr(model_config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_labels or 0)]
    if not names or not all(names) or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


# Attribute names of the module that outputs the class scores, across transformers' classification models.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score", "classification_head")


def classification_head(model: nn.Module) -> Optional[nn.Module]:
    """The module whose output is the class scores (where C2A's logit adjustment is added), if the model has one."""
    for name in CLASSIFICATION_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None
