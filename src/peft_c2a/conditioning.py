"""The client descriptor: validation, and the per-forward state that C2A layers read.

A client descriptor is what conditions the hypernetwork besides the adapter input itself: the client's label
distribution (when the task has labels) and optionally a client id. Callers pass it as keyword arguments of the
forward (`model(**batch, label_distribution=..., client_ids=...)`), through `model.generate(...)`, or set it for a
block of code with `model.client_descriptor(...)` (for pipelines and other code that cannot pass extra kwargs).

`C2AConditioning` is the one object shared by the tuner and all its layers; its state is split by lifetime:
- `default_descriptor`: the descriptor set for a block of code (`client_descriptor(...)`, `generate(...)`);
- `state`, a frozen `ForwardState`: what one forward reads. A forward pre-hook on the wrapped model pops the
  descriptor kwargs (so the base model never sees them), validates them, and replaces the state whole: the
  descriptor part of each active adapter's client embedding (computed once), the generators, the logit offsets, the
  attention masks and the KV-cache length. It stays until the next forward, because non-reentrant gradient
  checkpointing re-runs layers during backward and must see what the forward saw;
- `context_cache`: the causal context term's running sums, across the decoding steps of one generation.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class ForwardState:
    """What the C2A layers read during one forward: built whole by the tuner's pre-hook, never edited in place.

    It stays until the next forward, because non-reentrant gradient checkpointing re-runs layers during backward and
    must see what the forward saw.

    Attributes:
        descriptor_embeddings: per adapter, the descriptor part of the client embedding (label and client-id terms,
            which do not depend on the site), `(1 or batch, k)`, or `None` when the descriptor has neither.
        generators: per adapter, the scaled generator bases of this forward (computed once, shared by all sites;
            computed outside any checkpointed layer, so gradient checkpointing re-uses rather than re-records them).
        logit_offsets: what the logit adjustment adds to the class scores, `(1 or batch, num_labels)`, summed over
            the active adapters; `None` when nothing is added (no adjustment, or the uniform default descriptor).
        attention_mask / encoder_mask / decoder_mask: masks of the current forward (`None` means no padding).
        batch_size: examples in the current forward, to unflatten `(batch * length, hidden)` adapter inputs.
        past_length: positions already in the KV cache (0 outside cached decoding).
    """

    descriptor_embeddings: Mapping[str, Optional[torch.Tensor]] = field(default_factory=dict)
    generators: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    logit_offsets: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    encoder_mask: Optional[torch.Tensor] = None
    decoder_mask: Optional[torch.Tensor] = None
    batch_size: Optional[int] = None
    past_length: int = 0

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


@dataclass
class CachedContext:
    """Running sums of one site's causal context term, kept between decoding steps of one generation."""

    total: torch.Tensor  # (batch, hidden) sum of masked adapter inputs
    count: torch.Tensor  # (batch, 1) number of unmasked positions
    length: int  # positions seen, to check against the KV cache


class CausalContextCache:
    """The causal context of every site and adapter across the decoding steps of one generation (emptied when a
    forward starts without a KV cache)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], CachedContext] = {}

    def get(self, module_key: str, adapter_name: str) -> Optional[CachedContext]:
        return self._entries.get((module_key, adapter_name))

    def put(self, module_key: str, adapter_name: str, entry: CachedContext) -> None:
        self._entries[(module_key, adapter_name)] = entry

    def clear(self) -> None:
        self._entries.clear()


class C2AConditioning:
    """How a C2A tuner conditions its layers: one object, shared by the tuner and every `C2ALayer`.

    It holds the descriptor set for a block of code (`default_descriptor`, from `model.client_descriptor(...)` or
    `generate(...)`), which adapters are active, the `ForwardState` of the current forward and the causal context
    cache. The tuner's forward pre-hook calls `begin_forward`; the layers read `state` and the cache.

    Args:
        hypernets: the tuner's `ModuleDict` of hypernetworks, one per adapter name (read to build the state).
        active_adapters: the adapter names that condition the forward.
    """

    def __init__(self, hypernets: nn.ModuleDict, active_adapters: Sequence[str] = ()) -> None:
        self.hypernets = hypernets
        self.active_adapters = list(active_adapters)
        self.adapters_enabled = True
        self.in_forward = False  # a top-level forward is running (an encoder called alone by generate() is not)
        self.default_descriptor: dict[str, Any] = {}
        self.state = ForwardState()
        self.context_cache = CausalContextCache()

    def begin_forward(self, inputs: Mapping[str, Any], descriptor: Mapping[str, Any], training: bool) -> None:
        """The state of a top-level forward: its descriptor (or the default one), masks and KV-cache length."""
        attention_mask = inputs.get("attention_mask")
        # transformers >= 5.24 names the KV cache `cache`; earlier releases `past_key_values`
        cache = inputs.get("cache")
        past_length = _cache_length(cache if cache is not None else inputs.get("past_key_values"))
        if past_length == 0:
            self.context_cache.clear()
        self.state = ForwardState(
            **self._descriptor_state(descriptor, training),
            attention_mask=attention_mask,
            encoder_mask=attention_mask if attention_mask is not None else self.state.encoder_mask,
            decoder_mask=inputs.get("decoder_attention_mask"),
            batch_size=infer_batch_size(inputs),
            past_length=past_length,
        )

    def begin_encoder_forward(self, inputs: Mapping[str, Any], training: bool) -> None:
        """The state when a seq2seq model's encoder runs: inside a forward, only its mask is new; called alone (as
        `generate()` does), it also gets its own batch size and the default descriptor."""
        encoder_mask = inputs.get("attention_mask")
        if self.in_forward:
            self.state = replace(self.state, encoder_mask=encoder_mask)
            return
        self.state = replace(
            self.state,
            **self._descriptor_state({}, training),
            encoder_mask=encoder_mask,
            batch_size=infer_batch_size(inputs),
        )

    def _descriptor_state(self, descriptor: Mapping[str, Any], training: bool) -> dict[str, Any]:
        """Validate the descriptor of one forward; each active adapter's descriptor embedding, generators and logit
        offsets.

        With the adapters disabled (`disable_adapter()`) the forward is the base model's, which needs no descriptor:
        the descriptor is ignored and nothing is checked, so a reference pass in train mode (as TRL makes) works."""
        if not self.adapters_enabled:
            return {"descriptor_embeddings": {}, "generators": {}, "logit_offsets": None}
        label = descriptor.get("label_distribution", _MISSING)
        if label is _MISSING or label is None:
            label = self.default_descriptor.get("label_distribution")
        ids = descriptor.get("client_ids", _MISSING)
        if ids is _MISSING or ids is None:
            ids = self.default_descriptor.get("client_ids")

        embeddings: dict[str, Optional[torch.Tensor]] = {}
        generators: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        logit_offsets = None
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
                            "learn the wrong conditioning. With a plain `transformers.Trainer`, a `label_distribution` "
                            "column is dropped unless `remove_unused_columns=False` (the base model's forward does not "
                            "name it), or add it per batch with `peft_c2a.federated.DescriptorCollator`."
                        )
                    # documented behaviour: an unknown client at inference is described by the uniform distribution
                    probs = torch.full((1, hyper.num_labels), 1.0 / hyper.num_labels)
                else:
                    probs = normalize_label_distribution(label, hyper.num_labels)
                    if hyper.logit_adjustment > 0:
                        offsets = logit_adjustment(probs, hyper.logit_adjustment, hyper.logit_adjustment_eps)
                        offsets = offsets.to(hyper.layer_embedding.device)
                        logit_offsets = offsets if logit_offsets is None else logit_offsets + offsets
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
            embeddings[name] = hyper.descriptor_embedding(probs, client_ids)
            generators[name] = hyper.generators()
        return {"descriptor_embeddings": embeddings, "generators": generators, "logit_offsets": logit_offsets}

    @contextmanager
    def descriptor(self, **descriptor: Any) -> Iterator[None]:
        """Use this descriptor for every forward in the block that does not pass its own."""
        unknown = set(descriptor) - set(DESCRIPTOR_KWARGS)
        if unknown:
            raise TypeError(f"Unknown descriptor fields {sorted(unknown)}; expected {list(DESCRIPTOR_KWARGS)}.")
        previous = dict(self.default_descriptor)
        self.default_descriptor.update({k: v for k, v in descriptor.items() if v is not None})
        try:
            yield
        finally:
            self.default_descriptor = previous

    def forget_adapter(self, adapter_name: str) -> None:
        """Drop a deleted adapter from the current state."""
        self.state = replace(
            self.state,
            descriptor_embeddings={k: v for k, v in self.state.descriptor_embeddings.items() if k != adapter_name},
            generators={k: v for k, v in self.state.generators.items() if k != adapter_name},
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
