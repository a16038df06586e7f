"""The client descriptor: validation, and the per-forward state that C2A layers read.

A client descriptor is what conditions the hypernetwork besides the adapter input itself: the client's label
distribution (when the task has labels) and optionally a client id. Callers pass it as keyword arguments of the
forward (`model(**batch, label_distribution=..., client_ids=...)`), through `model.generate(...)`, or set it for a
block of code with `model.client_descriptor(...)` (for pipelines and other code that cannot pass extra kwargs).

`C2ARuntime` is the one object shared by the tuner and all its layers. A forward pre-hook on the wrapped model fills it
at the start of every forward: it pops the descriptor kwargs (so the base model never sees them), validates them,
computes the descriptor part of each active adapter's client embedding once, and records the attention masks and the
KV-cache length. The values stay until the next forward, because non-reentrant gradient checkpointing re-runs layers
during backward and must see what the forward saw.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .hypernetwork import C2AHyperNetwork

DESCRIPTOR_KWARGS = ("label_distribution", "client_ids")
_MISSING = object()


def normalize_label_distribution(label_distribution: Any, num_labels: int) -> torch.Tensor:
    """Check a label distribution (or label counts) and return it as float probabilities of shape `(n, num_labels)`.

    Accepts shape `(num_labels,)` (one descriptor for the whole batch) or `(batch, num_labels)`. Rows are normalised to
    sum to one, so raw label counts are fine.

    Raises:
        ValueError: wrong shape or size, NaN/inf, negative entries, or an all-zero row.
    """
    try:
        dist = torch.as_tensor(label_distribution)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`label_distribution` must be numeric label counts or probabilities: {error}") from error
    if dist.dtype == torch.bool or dist.is_complex():
        raise ValueError(f"`label_distribution` must be numeric, got dtype {dist.dtype}.")
    dist = dist.float()
    if dist.dim() == 1:
        dist = dist.unsqueeze(0)
    if dist.dim() != 2 or dist.shape[-1] != num_labels:
        raise ValueError(
            f"`label_distribution` must have shape (batch, {num_labels}) or ({num_labels},) to match the adapter's "
            f"`num_labels={num_labels}`, got shape {tuple(torch.as_tensor(label_distribution).shape)}."
        )
    if not torch.isfinite(dist).all():
        raise ValueError("`label_distribution` contains NaN or infinite values.")
    if (dist < 0).any():
        raise ValueError("`label_distribution` contains negative values; pass label counts or probabilities.")
    totals = dist.sum(dim=-1, keepdim=True)
    if (totals <= 0).any():
        rows = torch.nonzero(totals.squeeze(-1) <= 0).flatten().tolist()
        raise ValueError(f"`label_distribution` has all-zero rows {rows}; every row needs at least one positive entry.")
    return dist / totals


def logit_adjustment(probs: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """`tau * log(p + eps)`, centred over the classes: what the logit adjustment adds to the class scores.

    Centring changes no prediction or loss (softmax ignores a constant per row) but keeps the logits of a client near
    the base model's, and makes the offset of a uniform distribution exactly zero: an unknown client described as
    uniform and one described by nothing get identical logits.
    """
    log_prior = torch.log(probs + eps)
    offsets = tau * (log_prior - log_prior.mean(dim=-1, keepdim=True))
    uniform = (probs == probs[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(uniform, torch.zeros_like(offsets), offsets)


def check_client_ids(client_ids: Any, num_clients: int) -> torch.Tensor:
    """Check client ids: an integer tensor of shape `(batch,)` (or a scalar) with values in `[0, num_clients)`."""
    try:
        ids = torch.as_tensor(client_ids)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`client_ids` must be integer client ids: {error}") from error
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"`client_ids` must be an integer tensor, got dtype {ids.dtype}.")
    ids = ids.long().reshape(-1) if ids.dim() == 0 else ids.long()
    if ids.dim() != 1:
        raise ValueError(f"`client_ids` must have shape (batch,), got shape {tuple(ids.shape)}.")
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_clients):
        raise ValueError(
            f"`client_ids` must lie in [0, {num_clients}) (`num_clients={num_clients}`), "
            f"got values from {int(ids.min())} to {int(ids.max())}."
        )
    return ids


@dataclass
class _CachedContext:
    """Running sums of a causal context term, kept between decoding steps of one generation."""

    total: torch.Tensor  # (batch, hidden) sum of masked adapter inputs
    count: torch.Tensor  # (batch, 1) number of unmasked positions
    length: int  # positions seen, to check against the KV cache


@dataclass
class C2ARuntime:
    """State shared by a C2A tuner and its layers for the current forward.

    Attributes:
        hypernets: the tuner's `ModuleDict` of hypernetworks, one per adapter name (held by reference, so it is not
            registered, and not saved, under every layer).
        static_embeddings: per adapter, the descriptor part of the client embedding, `(1 or batch, k)` or `None`.
        logit_offsets: what the logit adjustment adds to the class scores of this forward, `(1 or batch,
            num_labels)`, summed over the active adapters; `None` when nothing is added (no adjustment, or the
            uniform default descriptor of an unknown client).
        generators: per adapter, the row-normalised generator bases of this forward (computed once, shared by all
            sites; computed outside any checkpointed layer, so gradient checkpointing re-uses rather than re-records
            them).
        in_forward: whether a top-level forward is running (an encoder called alone, as by `generate()`, is not).
        attention_mask / encoder_mask / decoder_mask: masks of the current forward (`None` means no padding).
        batch_size: examples in the current forward, to unflatten `(batch * length, hidden)` adapter inputs.
        past_length: positions already in the KV cache (0 outside cached decoding).
    """

    hypernets: nn.ModuleDict
    static_embeddings: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    logit_offsets: Optional[torch.Tensor] = None
    generators: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    in_forward: bool = False
    attention_mask: Optional[torch.Tensor] = None
    encoder_mask: Optional[torch.Tensor] = None
    decoder_mask: Optional[torch.Tensor] = None
    past_length: int = 0
    batch_size: Optional[int] = None
    ambient: dict[str, Any] = field(default_factory=dict)
    context_cache: dict[str, _CachedContext] = field(default_factory=dict)
    active_adapters: list[str] = field(default_factory=list)
    adapters_enabled: bool = True

    # ------------------------------------------------------------------ descriptor
    def begin_forward(self, descriptor: dict[str, Any], training: bool) -> None:
        """Resolve and validate the descriptor of one forward and precompute each adapter's static embedding."""
        label = descriptor.get("label_distribution", _MISSING)
        if label is _MISSING or label is None:
            label = self.ambient.get("label_distribution")
        ids = descriptor.get("client_ids", _MISSING)
        if ids is _MISSING or ids is None:
            ids = self.ambient.get("client_ids")

        self.static_embeddings = {}
        self.generators = {}
        self.logit_offsets = None
        for name in self.active_adapters:
            if name not in self.hypernets:
                continue
            hyper: C2AHyperNetwork = self.hypernets[name]
            probs = None
            if hyper.num_labels is not None:
                if label is None:
                    if training:
                        raise ValueError(
                            "C2A adapter is training without `label_distribution`: pass each example's client label "
                            "distribution (shape (batch, num_labels)). Training on the uniform default would silently "
                            "learn the wrong conditioning."
                        )
                    # documented behaviour: an unknown client at inference is described by the uniform distribution
                    probs = torch.full((1, hyper.num_labels), 1.0 / hyper.num_labels)
                else:
                    probs = normalize_label_distribution(label, hyper.num_labels)
                    if hyper.logit_adjustment > 0 and self.adapters_enabled:
                        offsets = logit_adjustment(probs, hyper.logit_adjustment, hyper.logit_adjustment_eps)
                        offsets = offsets.to(hyper.layer_embedding.device)
                        self.logit_offsets = offsets if self.logit_offsets is None else self.logit_offsets + offsets
            elif label is not None:
                raise ValueError(
                    "`label_distribution` was passed but the C2A adapter has no label term (`num_labels` is unset)."
                )
            client_ids = None
            if hyper.num_clients is not None:
                if ids is None and training:
                    raise ValueError("C2A adapter with `num_clients` is training without `client_ids`.")
                if ids is not None:
                    client_ids = check_client_ids(ids, hyper.num_clients)
            elif ids is not None:
                raise ValueError("`client_ids` was passed but the C2A adapter has no client embedding (`num_clients`).")
            self.static_embeddings[name] = hyper.descriptor_embedding(probs, client_ids)
            self.generators[name] = hyper.generators()

    @contextmanager
    def descriptor(self, **descriptor: Any) -> Iterator[None]:
        """Use this descriptor for every forward in the block that does not pass its own."""
        unknown = set(descriptor) - set(DESCRIPTOR_KWARGS)
        if unknown:
            raise TypeError(f"Unknown descriptor fields {sorted(unknown)}; expected {list(DESCRIPTOR_KWARGS)}.")
        previous = dict(self.ambient)
        self.ambient.update({k: v for k, v in descriptor.items() if v is not None})
        try:
            yield
        finally:
            self.ambient = previous

    # ------------------------------------------------------------------ masks and cache
    def record_inputs(self, bound: dict[str, Any]) -> None:
        """Record the masks and the KV-cache length of a top-level forward."""
        self.attention_mask = bound.get("attention_mask")
        if self.attention_mask is not None:
            self.encoder_mask = self.attention_mask
        self.decoder_mask = bound.get("decoder_attention_mask")
        self.batch_size = infer_batch_size(bound)
        # transformers >= 5.24 names the KV cache `cache`; earlier releases `past_key_values`
        cache = bound.get("cache")
        self.past_length = _cache_length(cache if cache is not None else bound.get("past_key_values"))
        if self.past_length == 0:
            self.context_cache = {}

    def mask_for(self, decoder_site: bool, encoder_decoder: bool, length: int) -> Optional[torch.Tensor]:
        """The padding mask for `length` positions seen by a site, aligned to the current (last) positions."""
        if encoder_decoder:
            mask = self.decoder_mask if decoder_site else self.encoder_mask
        else:
            mask = self.attention_mask
        if mask is None or mask.dim() != 2:
            return None
        if mask.shape[1] == length:
            return mask
        if mask.shape[1] > length:
            # cached decoding: the mask covers past + current positions
            return mask[:, -length:]
        raise ValueError(
            f"The attention mask covers {mask.shape[1]} positions but the adapter input has {length}; C2A's context "
            "term needs a mask aligned with the hidden states (set `use_context=False` for such models)."
        )


def infer_batch_size(bound: dict[str, Any]) -> Optional[int]:
    """Number of examples of a forward call, from its token ids, embeddings or mask."""
    for name in ("input_ids", "inputs_embeds", "attention_mask", "decoder_input_ids"):
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None


def _cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:  # legacy tuple-of-tuples cache: (layers)(key, value) with key (batch, heads, length, dim)
        return int(past_key_values[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def bind_forward_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a forward call's positional arguments to parameter names (masks may come positionally)."""
    if not args:
        return kwargs
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound
