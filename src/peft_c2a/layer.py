"""Adapter layers: a bottleneck adapter on the output of a linear projection, with learned or generated weights.

Both layers wrap a linear output projection `h = base(x)` and return `h + act(h W_down + b1) W_up + b2`. They share
everything but where `W_down` and `W_up` come from: `BottleneckAdapterLayer` learns them, `C2ALayer` asks the
shared hypernetwork to generate them for each example (or, for causal context, each position).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.activations import ACT2FN

from .conditioning import C2AConditioning, CachedContext
from .config import C2AConfig, _AdapterSitesConfig
from .sites import AdapterSite


class _BottleneckLayerBase(nn.Module, BaseTunerLayer):
    """Wraps a linear output projection and adds the deltas of all active adapters to its output."""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_act = nn.ModuleDict({})
        self.adapter_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        _, out_features = _get_in_out_features(self.get_base_layer())
        if out_features is None:
            raise TypeError(f"Bottleneck adapters wrap linear layers; got {type(self.get_base_layer()).__name__}.")
        self.out_features = out_features
        self.kwargs = kwargs

    def _update_common(self, adapter_name: str, config: _AdapterSitesConfig) -> None:
        self.adapter_act[adapter_name] = ACT2FN[config.adapter_activation]
        dropout = config.adapter_dropout
        self.adapter_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _adapter_delta(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement `_adapter_delta`.")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        delta = None
        for name in self.active_adapters:
            if name not in self.adapter_act:
                continue
            adapter_delta = self._adapter_delta(result, name)
            delta = adapter_delta if delta is None else delta + adapter_delta
        return result if delta is None else result + delta.to(result.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot be merged into the base weights: the adapter is non-linear (and C2A's "
            "weights depend on the input). Keep the adapter, or use `unload()` to drop it."
        )

    def unmerge(self) -> None:
        """Nothing to undo: these adapters are never merged."""

    def __repr__(self) -> str:
        return f"{type(self).__name__.lower()}.{super().__repr__()}"


class BottleneckAdapterLayer(_BottleneckLayerBase):
    """Plain bottleneck adapter with learned `W_down`, `W_up` (zero-initialised up path: identity at start)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: _AdapterSitesConfig, **kwargs: Any):
        super().__init__(base_layer, **kwargs)
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def update_layer(self, adapter_name: str, config: _AdapterSitesConfig, inference_mode: bool = False) -> None:
        r, d = config.bottleneck_dim, self.out_features
        self._update_common(adapter_name, config)
        self.bottleneck_down[adapter_name] = nn.Linear(d, r)
        up = nn.Linear(r, d)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._upcast_low_precision(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _upcast_low_precision(self, adapter_name: str) -> None:
        # like PEFT's autocast_adapter_dtype: adapter weights train in float32 even on a bf16/fp16 base model
        for container in (self.bottleneck_down, self.bottleneck_up):
            if container[adapter_name].weight.dtype in (torch.float16, torch.bfloat16):
                container[adapter_name].float()

    def _adapter_delta(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        down = self.bottleneck_down[adapter_name]
        x = self.adapter_dropout[adapter_name](hidden.to(down.weight.dtype))
        return self.bottleneck_up[adapter_name](self.adapter_act[adapter_name](down(x)))


class C2ALayer(_BottleneckLayerBase):
    """Bottleneck adapter whose weights the shared C2A hypernetwork generates from the client embedding.

    The layer owns only its adapter biases. The tuner hands it the shared hypernetworks (as PEFT's VeRA hands its
    layers the shared projections) and the conditioning object that holds the current forward's state; neither is
    registered here, so the hypernetworks are saved once, on the tuner.
    """

    adapter_layer_names = ("c2a_down_bias", "c2a_up_bias")
    other_param_names = ("adapter_act", "adapter_dropout", "c2a_layer_id", "c2a_site", "c2a_decoder_site", "c2a_causal")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: C2AConfig,
        hypernets: nn.ModuleDict,
        conditioning: C2AConditioning,
        module_key: str,
        site: AdapterSite,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_layer, **kwargs)
        self.c2a_down_bias = nn.ParameterDict({})
        self.c2a_up_bias = nn.ParameterDict({})
        self.c2a_layer_id: dict[str, int] = {}
        self.c2a_site: dict[str, int] = {}
        self.c2a_decoder_site: dict[str, bool] = {}
        self.c2a_causal: dict[str, bool] = {}
        # plain attributes, not submodules: registered here, every layer would save its own copy of the hypernetworks
        object.__setattr__(self, "_c2a_hypernets", hypernets)
        object.__setattr__(self, "_c2a_conditioning", conditioning)
        self._c2a_module_key = module_key  # this module's name: its key in the causal context cache
        self._c2a_encoder_decoder = site.encoder_decoder
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, site, inference_mode=config.inference_mode)

    def update_layer(
        self, adapter_name: str, config: C2AConfig, site: AdapterSite, inference_mode: bool = False
    ) -> None:
        self._update_common(adapter_name, config)
        self.c2a_layer_id[adapter_name] = site.layer_id
        self.c2a_site[adapter_name] = site.kind
        self.c2a_decoder_site[adapter_name] = site.decoder_site
        self.c2a_causal[adapter_name] = site.causal
        if self.adapter_layer_names:  # the adapter biases (C2A-LoRA's layer has none)
            device = self.get_base_layer().weight.device
            self.c2a_down_bias[adapter_name] = nn.Parameter(torch.zeros(config.bottleneck_dim, device=device))
            self.c2a_up_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ------------------------------------------------------------------ the adapter
    def _adapter_delta(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        act = self.adapter_act[adapter_name]
        biases = (self.c2a_down_bias[adapter_name], self.c2a_up_bias[adapter_name])
        return self._generated_delta(hidden, adapter_name, act, biases)

    def _generated_delta(
        self,
        source: torch.Tensor,
        adapter_name: str,
        act: Any,
        biases: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """`act(x W_down(e) + b1) W_up(e) + b2` of the adapter input `source` (dropout applied), with the client
        embedding `e` of each example (or position) and the generators narrowed to this site's widths."""
        state = self._c2a_conditioning.state
        hyper = self._c2a_hypernets[adapter_name]
        generators = state.generators.get(adapter_name)
        if generators is not None and generators[0].requires_grad and not torch.is_grad_enabled():
            # made with gradients by the top-level forward, used without: a reentrant checkpoint's forward
            raise ValueError(
                "C2A adapters do not support reentrant activation checkpointing (`use_reentrant=True`): every layer's "
                "adapter is generated from tensors made once per forward, which a reentrant checkpoint would "
                "backpropagate through once per layer. Pass `gradient_checkpointing_kwargs={'use_reentrant': False}` "
                "(the transformers default)."
            )
        layer_id, site = self.c2a_layer_id[adapter_name], self.c2a_site[adapter_name]
        dtype = hyper.down_factor.dtype
        flat_shape = source.shape if source.dim() == 2 else None
        if flat_shape is not None:
            # (batch, hidden), or tokens flattened to (batch * length, hidden) as OPT's feed-forward does
            source = source.reshape(self._unflattened_batch(flat_shape[0]), -1, flat_shape[-1])
        elif source.dim() != 3:
            raise ValueError(f"C2A adapters expect (batch, length, hidden) inputs, got shape {tuple(source.shape)}.")
        x = self.adapter_dropout[adapter_name](source.to(dtype))
        batch, length = x.shape[0], x.shape[1]

        embedding = hyper.site_embedding_for(layer_id, site).unsqueeze(0)  # (1, k)
        described = state.descriptor_embeddings.get(adapter_name)
        if described is not None:
            if described.shape[0] not in (1, batch):
                raise ValueError(
                    f"The client descriptor has {described.shape[0]} rows but the batch has {batch} examples; pass one "
                    "row per example or a single row for the whole batch."
                )
            embedding = embedding + described.to(dtype)
        if hyper.context_weight is not None:
            pooled = self._pooled_context(source, adapter_name, length)
            embedding = (embedding.unsqueeze(1) if pooled.dim() == 3 else embedding) + hyper.context_embedding(pooled)

        embedding = hyper.client_embedding_from_terms(embedding)
        gen_down, gen_up = generators or hyper.generators()  # (k, r, d) each, scaled
        gen_down, gen_up = gen_down[..., : x.shape[-1]], gen_up[..., : self.out_features]
        down_bias, up_bias = biases if biases is not None else (0.0, 0.0)
        if embedding.dim() == 2:
            # one client embedding per example: generate each example's matrices, then apply them batched
            w_down = torch.einsum("bk,krd->bdr", embedding, gen_down)
            w_up = torch.einsum("bk,krd->brd", embedding, gen_up)
            out = act(torch.matmul(x, w_down) + down_bias)
            out = torch.matmul(out, w_up) + up_bias
        else:
            # one embedding per position (causal context): contract through the k basis adapters instead of
            # materialising a (batch, length, d, r) weight tensor
            k, r, d = gen_down.shape
            projected = torch.matmul(x, gen_down.permute(2, 0, 1).reshape(d, k * r)).view(batch, length, k, r)
            out = act(torch.einsum("btkr,btk->btr", projected, embedding) + down_bias)
            mixed = (embedding.unsqueeze(-1) * out.unsqueeze(-2)).reshape(batch, length, k * r)
            out = torch.matmul(mixed, gen_up.reshape(k * r, -1)) + up_bias
        return out.reshape(flat_shape[0], -1) if flat_shape is not None else out

    def _unflattened_batch(self, rows: int) -> int:
        batch = self._c2a_conditioning.state.batch_size
        if batch is None or rows == batch:
            return rows
        if rows % batch:
            raise ValueError(
                f"C2A adapter got {rows} rows of hidden states for a batch of {batch} examples; it cannot tell which "
                "rows belong to which example."
            )
        return batch

    def _pooled_context(self, hidden: torch.Tensor, adapter_name: str, length: int) -> torch.Tensor:
        """Mask-aware mean of the adapter input: per example `(batch, d)`, or causal running mean `(batch, T, d)`."""
        conditioning = self._c2a_conditioning
        state = conditioning.state
        x = hidden.to(self._c2a_hypernets[adapter_name].down_factor.dtype)
        mask = state.mask_for(self.c2a_decoder_site[adapter_name], self._c2a_encoder_decoder, length)
        weights = None if mask is None else mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        if not self.c2a_causal[adapter_name]:
            if weights is None:
                return x.mean(dim=1)
            return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

        weights = torch.ones_like(x[..., :1]) if weights is None else weights
        totals = torch.cumsum(x * weights, dim=1)
        counts = torch.cumsum(weights, dim=1)
        if state.past_length > 0:
            cached = conditioning.context_cache.get(self._c2a_module_key, adapter_name)
            if cached is None or cached.length != state.past_length or cached.total.shape[0] != x.shape[0]:
                raise ValueError(
                    "C2A's causal context cache does not match the KV cache (it supports step-by-step decoding of one "
                    "batch, as in greedy search and sampling; not beam search or a cache from another call)."
                )
            totals = totals + cached.total.unsqueeze(1)
            counts = counts + cached.count.unsqueeze(1)
        conditioning.context_cache.put(
            self._c2a_module_key,
            adapter_name,
            CachedContext(totals[:, -1].detach(), counts[:, -1].detach(), state.past_length + length),
        )
        return totals / counts.clamp_min(1.0)


class C2ALoraLayer(C2ALayer):
    """C2A-LoRA: LoRA factors the shared hypernetwork generates from the client embedding, on a linear module.

    `base(x) + lora_alpha / r * B(e) A(e) dropout(x)` with `A(e) = W_down(e)^T` (`r x d_in`) and
    `B(e) = W_up(e)^T` (`d_out x r`): the C2A generators, applied to the module's input instead of its output, with no
    activation and no biases, so that a fixed client's update is exactly a LoRA update (and exports as one).
    """

    adapter_layer_names = ()
    other_param_names = (*C2ALayer.other_param_names, "c2a_lora_scaling")

    def update_layer(
        self, adapter_name: str, config: C2AConfig, site: AdapterSite, inference_mode: bool = False
    ) -> None:
        if not hasattr(self, "c2a_lora_scaling"):
            self.c2a_lora_scaling: dict[str, float] = {}
        self.c2a_lora_scaling[adapter_name] = config.lora_alpha / config.bottleneck_dim
        # no adapter biases (PEFT's bias="none", `adapter_layer_names` is empty): nothing of the layer's own trains
        super().update_layer(adapter_name, config, site, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.c2a_lora_scaling:
                continue
            delta = self._generated_delta(x, name, _identity, None) * self.c2a_lora_scaling[name]
            result = result + delta.reshape(result.shape).to(result.dtype)
        return result


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value
