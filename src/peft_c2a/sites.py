"""Where adapters sit: default target modules per architecture, and what each adapted module is.

A bottleneck adapter site is the output projection of an attention block or of a feed-forward block (C2A-LoRA's
sites are the linear modules PEFT's LoRA targets). Each adapted module gets a
*layer id* (which transformer block it belongs to) and a *site kind* (attention, feed-forward, cross-attention); the
hypernetwork embeds both. Both are derived from module names alone, so the same model and config always give the same
ids, which is what makes saved hypernetworks loadable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple, Optional

from torch import nn
from transformers.pytorch_utils import Conv1D

# Output projections of the attention block and of the feed-forward block, per `config.model_type`. Suffix matching
# (PEFT's rule) means "output.dense" also covers "attention.output.dense" in BERT-like encoders.
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "bert": ["attention.output.dense", "output.dense"],
    "roberta": ["attention.output.dense", "output.dense"],
    "xlm-roberta": ["attention.output.dense", "output.dense"],
    "camembert": ["attention.output.dense", "output.dense"],
    "electra": ["attention.output.dense", "output.dense"],
    "deberta-v2": ["attention.output.dense", "output.dense"],
    "deberta": ["attention.output.dense", "output.dense"],
    "distilbert": ["attention.out_lin", "ffn.lin2"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "llama": ["self_attn.o_proj", "mlp.down_proj"],
    "mistral": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen2": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen3": ["self_attn.o_proj", "mlp.down_proj"],
    "gemma": ["self_attn.o_proj", "mlp.down_proj"],
    "t5": ["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"],
    "mt5": ["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"],
}

SITE_ATTENTION = 0
SITE_FEED_FORWARD = 1
SITE_CROSS_ATTENTION = 2
NUM_SITE_KINDS = 3
SITE_NAMES = {SITE_ATTENTION: "attention", SITE_FEED_FORWARD: "feed_forward", SITE_CROSS_ATTENTION: "cross_attention"}


class AdapterSite(NamedTuple):
    """What one adapted module is, as the hypernetwork and its layer see it.

    Attributes:
        layer_id: index of its transformer block among the adapted ones (the layer embedding's row).
        kind: `SITE_ATTENTION`, `SITE_FEED_FORWARD` or `SITE_CROSS_ATTENTION` (the site embedding's row).
        decoder_site: whether it sits in a decoder (its mask is the decoder's in encoder-decoder models).
        causal: whether its context term is a running (causal) mean rather than a mean over the sequence.
        encoder_decoder: whether the model is an encoder-decoder (which mask the site reads).
    """

    layer_id: int
    kind: int
    decoder_site: bool
    causal: bool
    encoder_decoder: bool


_CROSS_ATTENTION_PARTS = {"crossattention", "encdecattention", "encoder_attn", "cross_attn", "crossattn"}
_LAYER_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def site_kind(module_name: str) -> int:
    """Classify an adapted module as attention, cross-attention or feed-forward output from its dotted name."""
    parts = [part.lower() for part in module_name.split(".")]
    if any(part in _CROSS_ATTENTION_PARTS for part in parts):
        return SITE_CROSS_ATTENTION
    if any("attn" in part or "attention" in part for part in parts):
        return SITE_ATTENTION
    return SITE_FEED_FORWARD


def layer_key(module_name: str) -> str:
    """The name of the transformer block a module belongs to: its name up to the first numeric component.

    `bert.encoder.layer.3.attention.output.dense` -> `bert.encoder.layer.3`; T5's encoder and decoder blocks thus get
    different keys (`encoder.block.0` vs `decoder.block.0`).
    """
    match = _LAYER_INDEX.match(module_name)
    return match.group(1) if match else ""


def is_decoder_site(module_name: str, is_encoder_decoder: bool, is_decoder_only: bool) -> bool:
    """Whether a module runs over decoder positions (and so needs a causal context)."""
    if is_encoder_decoder:
        return "decoder" in module_name.split(".")
    return is_decoder_only


def is_decoder_only_model(model: nn.Module) -> bool:
    """Infer whether a transformers model is a decoder-only (causal) language model."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_adaptable(module: nn.Module) -> bool:
    """Adapters wrap linear output projections: `nn.Linear` or GPT-2's `Conv1D`."""
    return isinstance(module, (nn.Linear, Conv1D))


def unknown_architecture_error(model_type: str | None, module_names: Iterable[str]) -> ValueError:
    """A `ValueError` that names the linear modules seen, so the user can pick `target_modules`."""
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in module_names})
    known = ", ".join(sorted(TARGET_MODULES_BY_MODEL_TYPE))
    return ValueError(
        f"Cannot choose adapter sites for model type {model_type!r}: it has no default `target_modules` "
        f"(known types: {known}). Linear modules seen in the model: {leaf_names}. Set `target_modules` to the output "
        "projections of the attention and feed-forward blocks, e.g. "
        "`C2AConfig(target_modules=['attn.out_proj', 'mlp.fc2'], ...)`."
    )


def out_features(module: nn.Module) -> int:
    """The output width of a linear module (`nn.Linear` or GPT-2's `Conv1D`)."""
    from peft.tuners.tuners_utils import _get_in_out_features

    return _get_in_out_features(module)[1]


def in_features(module: nn.Module) -> int:
    """The input width of a linear module (`nn.Linear` or GPT-2's `Conv1D`)."""
    from peft.tuners.tuners_utils import _get_in_out_features

    return _get_in_out_features(module)[0]


def default_lora_targets(model_type: Optional[str]) -> Optional[list[str]]:
    """PEFT's default LoRA target modules for an architecture (`query` / `value` for BERT), if it has them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)


def plan_sites(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    use_context: bool,
    causal_context: Optional[bool],
    per_target_kinds: bool = False,
) -> dict[str, AdapterSite]:
    """The `AdapterSite` of every targeted module, by name.

    Bottleneck sites must all have one output width and are of three kinds (attention, feed-forward,
    cross-attention). With `per_target_kinds` (C2A-LoRA: linear modules of any widths, such as a query and a
    value projection in the same block) every distinct pair (module leaf name, attention / feed-forward /
    cross-attention) is a kind of its own, numbered in model order, so that two targets of one block get different
    site embeddings. `causal_context=None` makes exactly the decoder sites causal. Raises `ValueError` for no
    targets, bottleneck targets of several widths, LoRA targets that are not `nn.Linear`, or a non-causal context
    term on a decoder site (it would let later tokens change earlier outputs: the model would see the future while
    training).
    """
    if not targets:
        raise ValueError("C2A needs `target_modules` that match the model (the hypernetwork is sized from them).")
    if per_target_kinds:
        not_linear = [key for key, module in targets if not isinstance(module, nn.Linear)]
        if not_linear:
            raise ValueError(
                f"C2A-LoRA generates LoRA factors for nn.Linear modules; {not_linear[0]!r} is a "
                f"{type(dict(targets)[not_linear[0]]).__name__}. Choose nn.Linear `target_modules` or "
                "`adapter_kind='bottleneck'`."
            )
    widths = {out_features(module) for _, module in targets}
    if not per_target_kinds and len(widths) != 1:
        raise ValueError(
            f"C2A generates adapters of one width, but the targeted modules output {sorted(widths)} features. "
            "Restrict `target_modules` to projections of one hidden size."
        )
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    decoder_only = is_decoder_only_model(model)
    layer_ids: dict[str, int] = {}
    kinds: dict[tuple[str, int], int] = {}
    plan = {}
    for key, _ in targets:
        layer_id = layer_ids.setdefault(layer_key(key), len(layer_ids))
        kind = site_kind(key)
        if per_target_kinds:
            kind = kinds.setdefault((key.rsplit(".", 1)[-1], kind), len(kinds))
        decoder_site = is_decoder_site(key, encoder_decoder, decoder_only)
        causal = decoder_site if causal_context is None else causal_context
        if decoder_site and use_context and not causal:
            raise ValueError(
                f"C2AConfig(causal_context=False) on {key!r}, a decoder module: a context pooled over the whole "
                "sequence lets later tokens change the outputs at earlier positions (the model would see the "
                "future while training). Leave `causal_context` unset (causal where needed) or set "
                "`use_context=False`."
            )
        plan[key] = AdapterSite(layer_id, kind, decoder_site, causal, encoder_decoder)
    return plan
