"""Descriptor validation (property-based) and how the runtime picks masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_c2a import check_client_ids, normalize_label_distribution

from .test_c2a_properties import DESCRIPTORS, c2a_config, make_non_trivial

counts = st.lists(st.integers(min_value=0, max_value=1000), min_size=4, max_size=4).filter(lambda row: sum(row) > 0)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(counts, min_size=1, max_size=6), scale=st.floats(min_value=1e-3, max_value=1e3))
def test_normalised_rows_sum_to_one_and_ignore_scale(rows, scale):
    table = torch.tensor(rows, dtype=torch.float64)
    probs = normalize_label_distribution(table, 4)
    assert probs.shape == (len(rows), 4) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-6)
    assert (probs >= 0).all()
    assert torch.allclose(normalize_label_distribution(table * scale, 4), probs, atol=1e-6)


@given(value=st.sampled_from([float("nan"), float("inf"), -1.0]), position=st.integers(0, 3))
def test_any_bad_entry_is_rejected(value, position):
    row = torch.ones(4)
    row[position] = value
    with pytest.raises(ValueError):
        normalize_label_distribution(row, 4)


def test_non_numeric_and_integer_inputs():
    assert torch.equal(normalize_label_distribution([1, 1, 2], 3), torch.tensor([[0.25, 0.25, 0.5]]))
    with pytest.raises(ValueError, match="numeric"):
        normalize_label_distribution(torch.tensor([True, False, True]), 3)
    with pytest.raises(ValueError, match="numeric"):
        normalize_label_distribution(["a", "b", "c"], 3)
    assert torch.equal(
        normalize_label_distribution(torch.tensor([2, 2], dtype=torch.int8), 2), torch.tensor([[0.5, 0.5]])
    )
    assert torch.equal(check_client_ids(2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        check_client_ids(torch.zeros(2, 2, dtype=torch.long), 3)


def test_positional_mask_is_seen_when_the_base_model_is_called_directly(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    hf_model = model.base_model.model
    with torch.no_grad():
        by_keyword = hf_model(**batch, label_distribution=DESCRIPTORS).logits
        by_position = hf_model(batch["input_ids"], batch["attention_mask"], label_distribution=DESCRIPTORS).logits
    assert torch.equal(by_keyword, by_position)
    state = model.base_model._c2a_conditioning.state
    assert torch.equal(state.attention_mask, batch["attention_mask"])


def test_padding_is_excluded_from_the_context(tiny_bert, batch):
    """Changing what sits under padding must not change any real position's output."""
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    noisy = dict(batch)
    noisy["input_ids"] = batch["input_ids"].clone()
    noisy["input_ids"][batch["attention_mask"] == 0] = 57
    with torch.no_grad():
        a = model(**batch, label_distribution=DESCRIPTORS).logits
        b = model(**noisy, label_distribution=DESCRIPTORS).logits
    assert (a - b).abs().max() <= 1e-5
