"""Exporting one client's C2A adapter as a static adapter: generate once, serve without the hypernetwork.

A C2A adapter's weights are a function of the client descriptor (and, with the context term, of each input). For a
fixed client and `use_context=False` they are constants: at every site `W_down`, `W_up` follow from the client's
embedding `e = normalize(site term + descriptor term)`, and the logit adjustment is a constant vector added to the
class scores. The export writes exactly that as a plain `BOTTLENECK` adapter folder (C2A-LoRA: a plain PEFT `LoRA`
folder, which loads without peft-c2a and merges into the base weights): the generated matrices as the adapter's
learned weights, C2A's adapter biases as its biases, and the logit adjustment folded into the bias of the
classifier's output layer (saved with the adapter, as PEFT saves every task head). Loading it with
`PeftModel.from_pretrained` reproduces the C2A model's outputs for that client without the hypernetwork's work.

With the context term on, no static adapter is exact (the weights move with every input), so the export refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn

from .conditioning import check_client_ids, logit_adjustment, normalize_label_distribution
from .config import BottleneckAdapterConfig, C2AConfig
from .heads import CLASSIFICATION_HEAD_NAMES
from .layer import C2ALayer

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def export_static_adapter(
    tuner: nn.Module,
    save_directory: str | os.PathLike,
    label_distribution: Any = None,
    client_ids: Any = None,
    adapter_name: str = "default",
) -> Path:
    """Write the client's static adapter (`BOTTLENECK`, or `LORA` for C2A-LoRA; see the module docstring) to
    `save_directory`; return it.

    Args:
        tuner: the `C2AModel` (a `PeftModel`'s `base_model`).
        label_distribution: the client's label counts or probabilities, `(num_labels,)`; `None` is the unknown
            client (uniform), as at inference.
        client_ids: the client's id (one int) when the adapter has `num_clients`; `None` leaves the id term out.
        adapter_name: which C2A adapter to export.

    Raises:
        ValueError: the adapter uses the context term, the descriptor is invalid (wrong length, negative counts, an
            id out of range, several rows), or a logit adjustment has no bias to go into.
    """
    configs = tuner.peft_config
    if adapter_name not in configs or adapter_name not in tuner.c2a_hypernet:
        raise ValueError(f"No C2A adapter named {adapter_name!r}; the model has {sorted(configs)}.")
    config: C2AConfig = configs[adapter_name]
    config.check_exportable()
    hyper = tuner.c2a_hypernet[adapter_name]
    probs = _client_probabilities(hyper, label_distribution)
    ids = None
    if client_ids is not None:
        if hyper.num_clients is None:
            raise ValueError("`client_ids` was given but the C2A adapter has no client embedding (`num_clients`).")
        ids = check_client_ids(torch.as_tensor(client_ids).reshape(-1), hyper.num_clients)
        if ids.numel() != 1:
            raise ValueError(f"Export one client at a time: got {ids.numel()} client ids.")

    lora = config.adapter_kind == "lora"
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        descriptor = hyper.descriptor_embedding(probs, ids)
        gen_down, gen_up = hyper.generators()
        for name, layer in tuner.model.named_modules():
            if not isinstance(layer, C2ALayer) or adapter_name not in layer.c2a_layer_id:
                continue
            terms = hyper.site_embedding_for(layer.c2a_layer_id[adapter_name], layer.c2a_site[adapter_name])
            if descriptor is not None:
                terms = terms + descriptor[0]
            embedding = hyper.client_embedding_from_terms(terms)
            prefix = f"base_model.model.{name}"
            base = layer.get_base_layer()
            # narrowed to this site's widths, as the layer does; nn.Linear stores (out, in)
            down = torch.einsum("k,krd->rd", embedding, gen_down[..., : base.in_features if lora else None])
            up = torch.einsum("k,krd->dr", embedding, gen_up[..., : layer.out_features])
            if lora:  # A = W_down^T (r x d_in), B = W_up^T (d_out x r); the scale is LoraConfig's alpha / r
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = down, up
                continue
            tensors[f"{prefix}.bottleneck_down.weight"] = down
            tensors[f"{prefix}.bottleneck_down.bias"] = layer.c2a_down_bias[adapter_name]
            tensors[f"{prefix}.bottleneck_up.weight"] = up
            tensors[f"{prefix}.bottleneck_up.bias"] = layer.c2a_up_bias[adapter_name]
        offsets = None
        if label_distribution is not None and hyper.logit_adjustment > 0:  # the unknown client's offsets are zero
            offsets = logit_adjustment(probs, hyper.logit_adjustment, hyper.logit_adjustment_eps)[0]
        tensors.update(_saved_heads(tuner.model, adapter_name, offsets, hyper.num_labels))

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    sites = dict(
        task_type=config.task_type,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=sorted(set(config.modules_to_save)) if config.modules_to_save else None,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    if lora:
        static = LoraConfig(
            r=config.bottleneck_dim,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.adapter_dropout,
            bias="none",
            **sites,
        )
    else:
        static = BottleneckAdapterConfig(
            bottleneck_dim=config.bottleneck_dim,
            adapter_activation=config.adapter_activation,
            adapter_dropout=config.adapter_dropout,
            **sites,
        )
    static.save_pretrained(str(save_directory))
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    save_file(tensors, str(save_directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    descriptor_note = {
        "exported_from": "C2A",
        "label_distribution": None if probs is None else [round(float(p), 6) for p in probs[0]],
        "client_id": None if ids is None else int(ids[0]),
        "label_names": config.label_names,
    }
    (save_directory / "c2a_export.json").write_text(json.dumps(descriptor_note, indent=1) + "\n")
    return save_directory


def _client_probabilities(hyper: nn.Module, label_distribution: Any) -> Optional[torch.Tensor]:
    """The client's label probabilities `(1, num_labels)` (uniform when not given), or `None` without a label term."""
    if hyper.num_labels is None:
        if label_distribution is not None:
            raise ValueError("`label_distribution` was given but the C2A adapter has no label term (`num_labels`).")
        return None
    if label_distribution is None:
        return torch.full((1, hyper.num_labels), 1.0 / hyper.num_labels)
    probs = normalize_label_distribution(label_distribution, hyper.num_labels)
    if probs.dim() != 2 or probs.shape[0] != 1:
        raise ValueError(f"Export one client at a time: got a label distribution of shape {tuple(probs.shape)}.")
    return probs


def _saved_heads(
    model: nn.Module, adapter_name: str, offsets: Optional[torch.Tensor], num_labels: Optional[int]
) -> dict[str, torch.Tensor]:
    """The trained `modules_to_save` copies, under the keys PEFT saves them, with `offsets` (the client's logit
    adjustment) folded into the bias of the classifier's output layer."""
    tensors: dict[str, torch.Tensor] = {}
    folded = offsets is None
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        trained = wrapper.modules_to_save[adapter_name]
        state = {key: value.detach().clone() for key, value in trained.state_dict().items()}
        if not folded and name.rsplit(".", 1)[-1] in CLASSIFICATION_HEAD_NAMES:
            outputs = [
                (key, module)
                for key, module in trained.named_modules()
                if isinstance(module, nn.Linear) and module.out_features == num_labels
            ]
            if len(outputs) != 1 or outputs[0][1].bias is None:
                raise ValueError(
                    f"The classifier {name!r} has no single output layer with a bias to carry the client's logit "
                    "adjustment, so the export would not be exact. Export from an adapter trained with "
                    "`logit_adjustment=0`, or for the uniform client (`label_distribution=None`)."
                )
            key = f"{outputs[0][0]}.bias" if outputs[0][0] else "bias"
            state[key] = state[key] + offsets.to(state[key].dtype)
            folded = True
        tensors.update({f"base_model.model.{name}.{key}": value for key, value in state.items()})
    if not folded:
        raise ValueError("The client's logit adjustment has no saved classifier head to go into.")
    return tensors
