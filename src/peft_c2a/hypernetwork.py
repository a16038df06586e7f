"""The shared, factorised hypernetwork that generates every C2A adapter.

For a client embedding `e` of size `k`, an adapter site of width `d` and bottleneck `r`:

    e          = normalize(label term + context term + layer term + site term [+ client-id term])   # |e| = 1
    G_down     = rownorm(reshape(F_down S_down))   # k x r x d, F: (k r) x m, S: m x d; rows L2-normalised
    G_up       = reshape(F_up S_up)                # k x r x d, S_up starts at zero; the F's entries have std 1
    W_down(e)  = sqrt(r)            * sum_j e_j G_down[j]^T  # d x r
    W_up(e)    = up_scale(r, m)     * sum_j e_j G_up[j]      # r x d, up_scale = 0.95 sqrt(r) / m

Why these choices (each one fixes an update-size problem measured on the first version):
- *A unit client embedding.* The embedding is a sum of 3-5 terms; normalising the sum keeps every generated adapter
  at the scale the fixed factors assume, whatever the number of terms or how far they drift in training.
- *A weak context term at the start.* The context projection starts ten times weaker than the other terms, so early
  rounds condition on who the client is (label, layer, site) before they condition on each example.
- *No gain on the up path.* The up generator is not row-normalised; its basis `S_up` starts at zero instead (the
  identity start, as LoRA's `B = 0`). Adam then moves `W_up` through the `m x d` entries of `S_up`, each by about
  the learning rate per step, like a plain adapter's `W_up`, rather than through one scalar per site that Adam moves
  by the full learning rate whatever its gradient. `up_scale` is set so that one step moves the generated `W_up` as
  far as Adam moves a plain adapter's (tests pin the ratio).
- *No shared bias row.* A bias row shared by the `k` generator rows is what the rows collapse onto at large learning
  rates (mean row cosine 0 -> 0.2 in ten steps at lr 1e-2); without it they stay independent, and the hypernetwork
  sends `2 r d` fewer numbers per round.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .config import CLASSIFICATION_TASKS, C2AConfig
from .sites import NUM_SITE_KINDS

# The context projection starts this much weaker than the label, layer and site terms.
CONTEXT_INIT_SCALE = 0.1
# Calibrates the up path: at the same learning rate a generated adapter's output moves as far as a plain adapter's
# (ratio 0.8-1.25 after 1 and 5 Adam steps at lr 1e-3 to 1e-2; tests/tuner/test_c2a_v2.py pins it on MiniLM).
UP_PATH_GAIN = 0.95


class C2AHyperNetwork(nn.Module):
    """Generates bottleneck-adapter weights from client embeddings; one instance per adapter name.

    Args:
        hidden_size: width `d` of the adapted hidden states (C2A-LoRA: the widest input of a target module).
        bottleneck_dim: adapter width `r`.
        client_embed_dim: size `k` of the client embedding.
        hyper_latent_dim: factorisation width `m`.
        num_layers: number of distinct transformer blocks that carry adapters (size of the layer embedding).
        num_labels: size of the label distribution, or `None` for no label term.
        num_clients: number of known clients, or `None` for no client-id embedding.
        use_context: whether a context projection (hidden state -> embedding) exists.
        use_label: whether the label distribution conditions the adapters (a label term); with `False` the label
            distribution may still reach the logits through the logit adjustment.
        logit_adjustment, logit_adjustment_eps: `tau` and `eps` of `tau * log(p + eps)`, added to the class scores
            by the tuner (`tau = 0`: nothing is added). Plain attributes: they configure, they do not train.
        generator: optional RNG for a reproducible initialisation.
        output_size: width of what the up generator produces, if not `hidden_size` (C2A-LoRA: the widest output of a
            target module; a narrower site uses the first columns of both generators).
        num_site_kinds: rows of the site embedding (C2A-LoRA has one kind per target module name and block part).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_dim: int,
        client_embed_dim: int,
        hyper_latent_dim: int,
        num_layers: int,
        num_labels: Optional[int] = None,
        num_clients: Optional[int] = None,
        use_context: bool = True,
        use_label: bool = True,
        logit_adjustment: float = 0.0,
        logit_adjustment_eps: float = 0.01,
        generator: Optional[torch.Generator] = None,
        output_size: Optional[int] = None,
        num_site_kinds: int = NUM_SITE_KINDS,
    ) -> None:
        super().__init__()
        d, r, k, m = hidden_size, bottleneck_dim, client_embed_dim, hyper_latent_dim
        d_out = output_size or hidden_size
        self.hidden_size, self.output_size, self.bottleneck_dim, self.client_embed_dim = d, d_out, r, k
        self.num_labels, self.num_clients = num_labels, num_clients
        self.logit_adjustment = logit_adjustment if num_labels else 0.0
        self.logit_adjustment_eps = logit_adjustment_eps

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        # Each term starts with norm ~1 (the context term ~0.1); the sum is normalised before use.
        embed_std = 1.0 / math.sqrt(k)
        self.label_weight = normal(k, num_labels, std=embed_std) if num_labels and use_label else None
        self.client_embedding = normal(num_clients, k, std=embed_std) if num_clients else None
        self.context_weight = normal(k, d, std=CONTEXT_INIT_SCALE * embed_std) if use_context else None
        self.layer_embedding = normal(num_layers, k, std=embed_std)
        self.site_embedding = normal(num_site_kinds, k, std=embed_std)

        # The factors are stored at unit scale and scaled in `generators()`: Adam moves every entry by ~lr whatever
        # its scale, so unit-scale storage keeps the factors' relative drift (and the compounding of F and S moving
        # together) small; the down generator is row-normalised, so its stored scale is free.
        self.down_factor = normal(k * r, m, std=1.0)
        self.down_basis = normal(m, d, std=1.0)
        self.up_factor = normal(k * r, m, std=1.0)
        self.up_basis = nn.Parameter(torch.zeros(m, d_out))

        self.down_scale = math.sqrt(r)
        # One Adam step moves every entry of `up_basis` by ~lr; through a unit embedding and `up_factor / sqrt(m)`
        # that moves an entry of W_up by ~lr * sqrt(m / r) when the step follows the gradient, where a plain
        # adapter's moves by ~lr. UP_PATH_GAIN is the measured remainder (benchmarks/calibration.py).
        self.up_scale = UP_PATH_GAIN * math.sqrt(r / m) / math.sqrt(m)

    @classmethod
    def from_config(
        cls, config: C2AConfig, hidden_size: int, output_size: int, num_layers: int, num_site_kinds: int
    ) -> C2AHyperNetwork:
        """The hypernetwork of a `C2AConfig` for sites of these widths (seeded by `init_seed`, if set)."""
        generator = None if config.init_seed is None else torch.Generator().manual_seed(config.init_seed)
        return cls(
            hidden_size=hidden_size,
            bottleneck_dim=config.bottleneck_dim,
            client_embed_dim=config.client_embed_dim,
            hyper_latent_dim=config.hyper_latent_dim,
            num_layers=num_layers,
            num_labels=config.num_labels,
            num_clients=config.num_clients,
            use_context=config.use_context,
            use_label=config.use_label_term,
            logit_adjustment=config.logit_adjustment if config.task_type in CLASSIFICATION_TASKS else 0.0,
            logit_adjustment_eps=config.logit_adjustment_eps,
            generator=generator,
            output_size=output_size,
            num_site_kinds=num_site_kinds,
        )

    # ------------------------------------------------------------------ embeddings
    def descriptor_embedding(
        self, label_probs: Optional[torch.Tensor], client_ids: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Label term plus client-id term, `(1 or batch, k)`, or `None` when the descriptor has neither."""
        device = self.layer_embedding.device
        embedding = None
        if self.label_weight is not None and label_probs is not None:
            embedding = F.linear(label_probs.to(device=device, dtype=self.label_weight.dtype), self.label_weight)
        if self.client_embedding is not None and client_ids is not None:
            client_term = self.client_embedding[client_ids.to(device)]
            embedding = client_term if embedding is None else embedding + client_term
        return embedding

    def site_embedding_for(self, layer_id: int, site: int) -> torch.Tensor:
        """Layer embedding plus site embedding, `(k,)`."""
        return self.layer_embedding[layer_id] + self.site_embedding[site]

    def context_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """Context term from mean-pooled adapter inputs `(..., d)`: L2-normalise, then project to `(..., k)`."""
        pooled = F.normalize(pooled, dim=-1, eps=1e-6)
        return F.linear(pooled.to(self.context_weight.dtype), self.context_weight[:, : pooled.shape[-1]])

    @staticmethod
    def client_embedding_from_terms(terms: torch.Tensor) -> torch.Tensor:
        """The client embedding from the sum of its terms `(..., k)`: unit L2 norm along the last dimension."""
        return F.normalize(terms, dim=-1, eps=1e-6)

    # ------------------------------------------------------------------ generators
    def generators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled generator bases of the down `(k, r, d)` and the up projections `(k, r, d_out)`.

        `W_down(e) = einsum("k,krd->dr", e, down)` and `W_up(e) = einsum("k,krd->rd", e, up)` for a unit `e`.
        """
        k, r = self.client_embed_dim, self.bottleneck_dim
        down = (self.down_factor @ self.down_basis).view(k, r, self.hidden_size)
        down = down / down.flatten(1).norm(dim=1).clamp_min(1e-6).view(k, 1, 1)
        up = (self.up_factor @ self.up_basis).view(k, r, self.output_size)
        return down * self.down_scale, up * self.up_scale

    @torch.no_grad()
    def generator_row_cosine(self) -> dict[str, float]:
        """Mean pairwise cosine of the `k` generator rows (down and up): 0 for independent rows, 1 when collapsed."""
        scores = {}
        for name, rows in zip(("down", "up"), self.generators(), strict=True):
            flat = F.normalize(rows.flatten(1).float(), dim=1, eps=1e-12)
            k = flat.shape[0]
            cosine = flat @ flat.T
            scores[name] = float((cosine.sum() - cosine.diagonal().sum()) / max(k * (k - 1), 1))
        return scores


# Tensors only the first version of the hypernetwork had (a per-site gain and shared bias rows).
FIRST_VERSION_TENSORS = ("up_gain", "down_bias", "up_bias")


def refuse_first_version_state(state_dict: dict, prefix: str, *args: object) -> None:
    """A load-state-dict pre-hook for the tuner's `c2a_hypernet` dict: refuse an adapter saved by the first version
    instead of loading it half (PEFT loads adapters non-strictly, and leaves keys it does not know unrenamed)."""
    found = [key for key in state_dict if key.startswith(prefix) and key.rsplit(".", 1)[-1] in FIRST_VERSION_TENSORS]
    if found:
        raise ValueError(
            f"This C2A adapter was saved by the first version of peft-c2a (it holds {found}); the hypernetwork has "
            "changed since (no per-site gain, no shared bias rows, a zero-start up generator), so it cannot be loaded. "
            "Train it again, or load it with peft-c2a 0.1.0 at commit a51c7c4."
        )
