"""A saved C2A classifier loads with `AutoPeftModelFor...Classification.from_pretrained(path)` and no extra
arguments: the base model's head is sized to the adapter's classes and its label names come back."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5ForSequenceClassification,
)

import peft_c2a
from peft_c2a.heads import resize_classifier_head

NAMES = ["world", "sport", "business", "tech", "politics"]
TINY = dict(num_attention_heads=2, intermediate_size=32, num_hidden_layers=2, hidden_size=16, vocab_size=60)


def save_headless_base(kind: str, path) -> None:
    """A base model without a classification head, as a sentence encoder is published."""
    torch.manual_seed(0)
    if kind == "bert":
        BertModel(BertConfig(**TINY)).save_pretrained(path)
    elif kind == "roberta":
        RobertaModel(RobertaConfig(**TINY, max_position_embeddings=40, pad_token_id=1)).save_pretrained(path)
    else:
        GPT2Model(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)).save_pretrained(path)


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_sequence_classifier_loads_without_arguments(kind, tmp_path):
    save_headless_base(kind, tmp_path / "base")
    id2label = dict(enumerate(NAMES))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=5, id2label=id2label)
    peft_model = get_peft_model(model, peft_c2a.C2AConfig(task_type="SEQ_CLS", bottleneck_dim=4, init_seed=0))
    assert peft_model.peft_config["default"].num_labels == 5
    assert peft_model.peft_config["default"].label_names == NAMES
    with torch.no_grad():  # a trained-looking head, so that loading the wrong one would show
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    inputs = {"input_ids": torch.randint(2, 60, (3, 9)), "label_distribution": torch.tensor([5.0, 1, 0, 2, 1])}
    expected = peft_model(**inputs).logits

    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert loaded.config.num_labels == 5 and loaded.config.id2label == id2label
    assert loaded.config.label2id == {name: i for i, name in enumerate(NAMES)}
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_token_classifier_loads_without_arguments(tmp_path):
    save_headless_base("bert", tmp_path / "base")
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "base", num_labels=3)
    peft_model = get_peft_model(model, peft_c2a.C2AConfig(task_type="TOKEN_CLS", bottleneck_dim=4, init_seed=0))
    assert peft_model.peft_config["default"].label_names is None  # only LABEL_i: nothing worth saving
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    inputs = {"input_ids": torch.randint(2, 60, (2, 7)), "label_distribution": torch.tensor([1.0, 2, 3])}
    loaded = AutoPeftModelForTokenClassification.from_pretrained(tmp_path / "adapter")
    assert loaded.config.num_labels == 3
    torch.testing.assert_close(loaded(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=1e-6)


def test_a_new_adapter_sizes_a_trainable_head_and_warns(tmp_path, caplog):
    save_headless_base("bert", tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    with caplog.at_level(logging.WARNING, logger="peft_c2a.model"):
        peft_model = get_peft_model(model, peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=5, bottleneck_dim=4))
    assert "from 2 to C2AConfig's 5 labels" in caplog.text
    assert peft_model.config.num_labels == 5
    assert peft_model(input_ids=torch.randint(2, 60, (2, 5))).logits.shape == (2, 5)


def test_a_head_that_is_not_saved_with_the_adapter_says_what_to_pass():
    config = T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, num_labels=2)
    model = T5ForSequenceClassification(config)  # its head, `classification_head`, is not in modules_to_save
    with pytest.raises(ValueError, match=r"num_labels=5\) before get_peft_model"):
        get_peft_model(model, peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=5, bottleneck_dim=4))


def test_label_names_must_match_num_labels():
    with pytest.raises(ValueError, match="3 names but `num_labels` is 2"):
        peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=2, label_names=["a", "b", "c"])


def test_resize_classifier_head_leaves_a_model_without_such_head_alone():
    model = AutoModelForSequenceClassification.from_config(BertConfig(**TINY, num_labels=2))
    assert resize_classifier_head(model, ["score"], 4) == []
    assert model.config.num_labels == 2 and model.classifier.out_features == 2
    assert resize_classifier_head(model, ["classifier"], 4, ["a", "b", "c", "d"]) == ["classifier"]
    assert model.classifier.out_features == 4 and model.config.id2label[3] == "d"
