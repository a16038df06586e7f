"""The shared, factorised hypernetwork that generates every C2A adapter.

For a client embedding `e` of size `k`, an adapter site of width `d` and bottleneck `r`:

    G_down = reshape(F_down S_down) + b_down      # k x r x d, F: (k r) x m, S: m x d, b: ONE row of r d
    G_up   = reshape(F_up S_up) + b_up
    W_down(e) = sqrt(r)      * sum_j e_j normalize(G_down[j])^T     # d x r
    W_up(e)   = g * sqrt(r d) * sum_j e_j normalize(G_up[j])        # r x d, g a zero-initialised gain per site

Rows are L2-normalised over their `r d` entries. The fixed scales make a unit-norm embedding produce weights of the
usual initialisation scale (`W_down` entries ~ 1/sqrt(d)) and let `W_up` move as fast as a plain adapter's under Adam.
The gain `g` starts at zero, so a freshly wrapped model is exactly its base model, without normalising an all-zero
generator (whose gradient explodes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .sites import NUM_SITE_KINDS


class C2AHyperNetwork(nn.Module):
    """Generates bottleneck-adapter weights from client embeddings; one instance per adapter name.

    Args:
        hidden_size: width `d` of the adapted hidden states.
        bottleneck_dim: adapter width `r`.
        client_embed_dim: size `k` of the client embedding.
        hyper_latent_dim: factorisation width `m`.
        num_layers: number of distinct transformer blocks that carry adapters (size of the layer embedding).
        num_labels: size of the label distribution, or `None` for no label term.
        num_clients: number of known clients, or `None` for no client-id embedding.
        use_context: whether a context projection (hidden state -> embedding) exists.
        generator: optional RNG for a reproducible initialisation.
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
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        d, r, k, m = hidden_size, bottleneck_dim, client_embed_dim, hyper_latent_dim
        self.hidden_size, self.bottleneck_dim, self.client_embed_dim = d, r, k
        self.num_labels, self.num_clients = num_labels, num_clients

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        # Each embedding term starts with norm ~1, so their sum has a sensible scale from the first step.
        embed_std = 1.0 / math.sqrt(k)
        self.label_weight = normal(k, num_labels, std=embed_std) if num_labels else None
        self.client_embedding = normal(num_clients, k, std=embed_std) if num_clients else None
        self.context_weight = normal(k, d, std=embed_std) if use_context else None
        self.layer_embedding = normal(num_layers, k, std=embed_std)
        self.site_embedding = normal(NUM_SITE_KINDS, k, std=embed_std)

        self.down_factor = normal(k * r, m, std=1.0 / math.sqrt(m))
        self.down_basis = normal(m, d, std=1.0 / math.sqrt(d))
        self.down_bias = nn.Parameter(torch.zeros(r * d))
        self.up_factor = normal(k * r, m, std=1.0 / math.sqrt(m))
        self.up_basis = normal(m, d, std=1.0 / math.sqrt(d))
        self.up_bias = nn.Parameter(torch.zeros(r * d))
        self.up_gain = nn.Parameter(torch.zeros(num_layers, NUM_SITE_KINDS))

        self.down_scale = math.sqrt(r)
        self.up_scale = math.sqrt(r * d)

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
        return F.linear(pooled.to(self.context_weight.dtype), self.context_weight)

    # ------------------------------------------------------------------ generators
    def generators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row-normalised generator bases `(k, r, d)` for the down and the up projections."""
        k, r, d = self.client_embed_dim, self.bottleneck_dim, self.hidden_size
        down = (self.down_factor @ self.down_basis).view(k, r, d) + self.down_bias.view(1, r, d)
        up = (self.up_factor @ self.up_basis).view(k, r, d) + self.up_bias.view(1, r, d)
        down = down / down.flatten(1).norm(dim=1).clamp_min(1e-6).view(k, 1, 1)
        up = up / up.flatten(1).norm(dim=1).clamp_min(1e-6).view(k, 1, 1)
        return down, up

    def up_gain_for(self, layer_id: int, site: int) -> torch.Tensor:
        return self.up_gain[layer_id, site] * self.up_scale
