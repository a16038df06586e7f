"""`model.export_adapter(...)` writes one client's C2A adapter as a plain BOTTLENECK adapter that reproduces the C2A
model's outputs for that client (context term off), on encoder, decoder and encoder-decoder models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

import peft_c2a

TINY_ENCODER = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def base_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(**TINY_ENCODER, num_labels=4))
    if kind == "roberta":
        config = RobertaConfig(**TINY_ENCODER, num_labels=4, max_position_embeddings=40, pad_token_id=1)
        return RobertaForSequenceClassification(config)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2))
    if kind == "gpt2_cls":
        config = GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, num_labels=4, pad_token_id=0)
        return GPT2ForSequenceClassification(config)
    config = T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


TASKS = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "gpt2": "CAUSAL_LM", "gpt2_cls": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def trained_c2a(kind: str, **config) -> PeftModel:
    """A C2A model without the context term whose every trainable tensor has moved (as after training)."""
    config = {"bottleneck_dim": 4, "use_context": False, "init_seed": 0, **config}
    return moved(get_peft_model(base_model(kind), peft_c2a.C2AConfig(task_type=TASKS[kind], **config)))


def moved(model: PeftModel) -> PeftModel:
    """`model` with every trainable tensor moved from its initialisation, as after training (a zero-start up path
    would make an export trivially exact)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "input_ids": torch.randint(2, 60, (3, 7), generator=generator),
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]]),
    }
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, 60, (3, 4), generator=generator)
    return inputs


@pytest.mark.parametrize(
    ("kind", "descriptor"),
    [
        ("bert", {"label_distribution": [5.0, 1.0, 0.0, 2.0]}),
        ("bert", {"label_distribution": None}),
        ("roberta", {"label_distribution": [0.0, 3.0, 3.0, 1.0]}),
        ("gpt2", {}),
        ("t5", {}),
    ],
)
def test_the_exported_adapter_reproduces_the_c2a_logits(kind, descriptor, tmp_path):
    model = trained_c2a(kind)
    inputs = inputs_for(kind)
    with torch.no_grad():
        expected = model(**inputs, **descriptor).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, expected, atol=1e-3)  # the adapter does something
    folder = model.export_adapter(tmp_path / "client", **descriptor)

    loaded = PeftModel.from_pretrained(base_model(kind), folder).eval()
    assert loaded.peft_config["default"].peft_type == "BOTTLENECK"
    assert not any(isinstance(module, peft_c2a.C2ALayer) for module in loaded.modules())
    with torch.no_grad():
        logits = loaded(**inputs).logits  # no descriptor: the client is baked in
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    note = json.loads((folder / "c2a_export.json").read_text())
    if descriptor.get("label_distribution") is not None:
        counts = torch.tensor(descriptor["label_distribution"])
        assert note["label_distribution"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)


def test_a_client_id_is_baked_in_too(tmp_path):
    model = trained_c2a("bert", num_clients=3)
    inputs = inputs_for("bert")
    with torch.no_grad():
        expected = model(**inputs, label_distribution=[1.0, 1.0, 4.0, 0.0], client_ids=2).logits
        other = model(**inputs, label_distribution=[1.0, 1.0, 4.0, 0.0], client_ids=0).logits
    folder = model.export_adapter(tmp_path / "c2", label_distribution=[1, 1, 4, 0], client_ids=2)
    loaded = PeftModel.from_pretrained(base_model("bert"), folder).eval()
    with torch.no_grad():
        logits = loaded(**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, other, atol=1e-4)


def test_export_refuses_what_it_cannot_reproduce(tmp_path):
    with pytest.raises(ValueError, match="use_context=False"):
        trained_c2a("bert", use_context=True).export_adapter(tmp_path / "a", label_distribution=[1, 1, 1, 1])
    model = trained_c2a("bert")
    with pytest.raises(ValueError, match="one client at a time"):
        model.export_adapter(tmp_path / "b", label_distribution=[[1, 1, 1, 1], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="4"):
        model.export_adapter(tmp_path / "c", label_distribution=[1, 1, 1])
    with pytest.raises(ValueError, match="num_clients"):
        model.export_adapter(tmp_path / "d", label_distribution=[1, 1, 1, 1], client_ids=0)
    with pytest.raises(ValueError, match="No C2A adapter named 'other'"):
        model.export_adapter(tmp_path / "e", adapter_name="other")
    # GPT-2's classifier has no bias: the logit adjustment cannot be folded in, the uniform client exports exactly
    gpt2 = trained_c2a("gpt2_cls")
    with pytest.raises(ValueError, match="no single output layer with a bias"):
        gpt2.export_adapter(tmp_path / "f", label_distribution=[3, 1, 0, 0])
    inputs = {"input_ids": torch.randint(2, 60, (2, 5))}
    folder = gpt2.export_adapter(tmp_path / "g")
    loaded = PeftModel.from_pretrained(base_model("gpt2_cls"), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, gpt2(**inputs).logits, rtol=0, atol=1e-5)


def test_exporting_leaves_the_c2a_model_unchanged(tmp_path):
    model = trained_c2a("bert")
    before = copy.deepcopy(model.state_dict())
    model.export_adapter(tmp_path / "x", label_distribution=[1, 2, 3, 4])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_the_export_command_writes_the_same_adapter(tmp_path, capsys):
    from peft_c2a.cli.export import main

    base_model("bert").save_pretrained(tmp_path / "base")
    model = trained_c2a("bert")
    model.save_pretrained(tmp_path / "c2a")
    inputs = inputs_for("bert")
    with torch.no_grad():
        expected = model(**inputs, label_distribution=[120, 3, 40, 7]).logits
    argv = [str(tmp_path / "c2a"), "--label-counts", "120,3,40,7", "--out", str(tmp_path / "client")]
    assert main([*argv, "--base-model", str(tmp_path / "base")]) == 0
    assert "wrote a BOTTLENECK adapter" in capsys.readouterr().out
    loaded = PeftModel.from_pretrained(base_model("bert"), tmp_path / "client").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)

    assert main([str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main([str(tmp_path / "client"), "--out", str(tmp_path / "x")]) == 1
    assert "holds a BOTTLENECK adapter, not a C2A one" in capsys.readouterr().err
    assert main(argv) == 1  # saved from a model built in memory: no base model name to load
    assert "--base-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "c2a"), "--label-counts", "a,b", "--out", str(tmp_path / "x")])
    assert "comma-separated numbers" in capsys.readouterr().err
