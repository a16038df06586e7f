"""Measurements of what an adapter does, for calibration tests, benchmarks and debugging.

- `adapter_output_shift`: how far the adapters move the hidden states they sit on, relative to those hidden states
  (`||adapter delta|| / ||base output||`, padding excluded, averaged over sites). Comparing it between a C2A model and
  a plain bottleneck model (or a C2A-LoRA model and a plain LoRA model) trained the same way says whether C2A's
  generated updates have the size of plain ones.
- `hidden_state_shift`: how far the last hidden state moved from a reference (e.g. the model before training).
- `generator_row_cosine` (on `C2AHyperNetwork`): whether the hypernetwork's basis adapters stay distinct.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@torch.no_grad()
def adapter_output_shift(model: nn.Module, inputs: dict[str, torch.Tensor], **descriptor: Any) -> float:
    """Mean over adapter sites of `||adapter delta|| / ||base layer output||` for one forward of `inputs`.

    Works for every PEFT tuner layer that wraps a `base_layer`: C2A, C2A-LoRA and plain bottleneck adapters, and
    PEFT's own LoRA layers (where the delta is `scaling * B A x` beside the projection `W x`). Positions where `inputs`'
    `attention_mask` is 0 are excluded.

    Raises:
        ValueError: the model has no adapter layer.
    """
    mask = inputs.get("attention_mask")
    ratios: list[torch.Tensor] = []
    hooks = []

    def masked(tensor: torch.Tensor) -> torch.Tensor:
        if mask is None or tensor.dim() != 3 or tensor.shape[:2] != mask.shape:
            return tensor
        return tensor * mask.unsqueeze(-1).to(tensor.dtype)

    for module in model.modules():
        # tuner layers only: `modules_to_save` copies (the classifier head) wrap no adapter delta
        if not isinstance(module, BaseTunerLayer) or not isinstance(getattr(module, "base_layer", None), nn.Module):
            continue
        seen: dict[str, torch.Tensor] = {}
        hooks.append(module.base_layer.register_forward_hook(lambda m, a, out, seen=seen: seen.update(base=out)))

        def after(m: nn.Module, a: tuple, out: torch.Tensor, seen: dict = seen) -> None:
            base = masked(seen["base"].float())
            ratios.append(masked(out.float() - seen["base"].float()).norm() / base.norm().clamp_min(1e-12))

        hooks.append(module.register_forward_hook(after))
    if not hooks:
        raise ValueError("The model has no adapter layers (PEFT tuner layers with a `base_layer`) to measure.")
    try:
        model(**inputs, **descriptor)
    finally:
        for hook in hooks:
            hook.remove()
    return float(torch.stack(ratios).mean())


@torch.no_grad()
def last_hidden_state(model: nn.Module, inputs: dict[str, torch.Tensor], **descriptor: Any) -> torch.Tensor:
    """The last hidden state of `inputs` (padding zeroed), for `hidden_state_shift`."""
    hidden = model(**inputs, **descriptor, output_hidden_states=True).hidden_states[-1].float()
    mask: Optional[torch.Tensor] = inputs.get("attention_mask")
    return hidden if mask is None else hidden * mask.unsqueeze(-1).to(hidden.dtype)


def hidden_state_shift(reference: torch.Tensor, hidden: torch.Tensor) -> float:
    """`||hidden - reference|| / ||reference||`."""
    return float((hidden - reference).norm() / reference.norm().clamp_min(1e-12))


def adapter_shift_during_training(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    learning_rate: float,
    steps: int,
    probe: dict[str, torch.Tensor],
    **descriptor: Any,
) -> list[float]:
    """Train `model` for `steps` Adam steps (no weight decay, cycling through `batches`, each with `labels`) and
    return `adapter_output_shift` on `probe` after every step: the update size a learning rate gives."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    shifts = []
    for step in range(steps):
        model.train()
        model(**batches[step % len(batches)], **descriptor).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        shifts.append(adapter_output_shift(model, probe, **descriptor))
    return shifts
