"""Shared fixtures: tiny random models for fast unit tests; the real packaged MiniLM for marked slow tests."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

NUM_LABELS = 3


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_bert_pair(tiny_bert):
    """A tiny BERT classifier and an untouched deep copy of it (the reference base model)."""
    return tiny_bert, copy.deepcopy(tiny_bert)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Four sequences of length 9; examples 1 and 3 are padded."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 100, (4, 9), generator=generator)
    attention_mask = torch.ones(4, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[3, 4:] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def activate_up_path(hyper, scale: float = 1.0, seed: int = 0) -> None:
    """Give a C2A hypernetwork a non-zero up generator (it starts at zero: identity), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hyper.up_basis.copy_(scale * torch.randn(hyper.up_basis.shape, generator=generator))


def without_logit_adjustment(model, logits: torch.Tensor) -> torch.Tensor:
    """`logits` of a C2A model's last forward less what its logit adjustment added (the adapters' own effect)."""
    conditioning = getattr(model.base_model, "_c2a_conditioning", None)
    offsets = conditioning.state.logit_offsets if conditioning is not None else None
    if offsets is None:
        return logits
    return logits - (offsets.unsqueeze(1) if logits.dim() == 3 else offsets)
