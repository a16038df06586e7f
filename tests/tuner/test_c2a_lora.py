"""C2A-LoRA (`adapter_kind="lora"`): the hypernetwork generates LoRA factors; a client's adapter exports as a plain
PEFT LoRA that loads without peft-c2a and, merged into the base weights, reproduces the C2A model's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import peft_c2a
from peft_c2a.layer import C2ALoraLayer

from .test_export import inputs_for, moved

TASKS = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
AUTO_CLASSES = {
    "bert": "AutoModelForSequenceClassification",
    "llama": "AutoModelForCausalLM",
    "t5": "AutoModelForSeq2SeqLM",
}


def base_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=4,
        )
        return BertForSequenceClassification(config)
    if kind == "llama":  # grouped-query attention: v_proj is narrower than q_proj (16 -> 8)
        config = LlamaConfig(
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        return LlamaForCausalLM(config)
    config = T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def c2a_lora(kind: str, perturb: bool = True, **config) -> PeftModel:
    config = {"adapter_kind": "lora", "bottleneck_dim": 4, "use_context": False, "init_seed": 0, **config}
    model = get_peft_model(base_model(kind), peft_c2a.C2AConfig(task_type=TASKS[kind], **config))
    return moved(model) if perturb else model.eval()


def test_lora_sites_start_as_the_base_model_and_get_their_own_embeddings():
    model = c2a_lora("bert", perturb=False, use_context=True)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, C2ALoraLayer)}
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == ["query", "value"]  # PEFT's LoRA defaults
    query, value = (layers[f"base_model.model.bert.encoder.layer.0.attention.self.{n}"] for n in ("query", "value"))
    assert query.c2a_layer_id["default"] == value.c2a_layer_id["default"]
    assert query.c2a_site["default"] != value.c2a_site["default"]
    assert not any("bias" in name for name, _ in query.named_parameters() if "base_layer" not in name)
    inputs = inputs_for("bert")
    with torch.no_grad():
        adapted = model(**inputs).logits  # uniform client: no logit offsets, and B = 0 at the start
        with model.disable_adapter():
            plain = model(**inputs).logits
    torch.testing.assert_close(adapted, plain, rtol=0, atol=1e-6)


def test_training_reaches_the_generators():
    model = c2a_lora("bert", perturb=False).train()
    loss = model(**inputs_for("bert"), labels=torch.tensor([0, 1, 2]), label_distribution=[3, 1, 1, 0]).loss
    loss.backward()
    hyper = model.base_model.c2a_hypernet["default"]
    assert hyper.up_basis.grad is not None and hyper.up_basis.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kind", "descriptor"), [("bert", {"label_distribution": [5, 1, 0, 2]}), ("llama", {}), ("t5", {})]
)
def test_the_exported_lora_loads_without_peft_c2a_and_merges_exactly(kind, descriptor, tmp_path):
    base_model(kind).save_pretrained(tmp_path / "base")
    model = c2a_lora(kind)
    inputs = inputs_for(kind)
    with torch.no_grad():
        expected = model(**inputs, **descriptor).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, expected, atol=1e-3)
    folder = model.export_adapter(tmp_path / "client", **descriptor)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "check.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        from peft import PeftModel
        data = torch.load({str(tmp_path / "check.pt")!r})
        base = getattr(transformers, {AUTO_CLASSES[kind]!r}).from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(folder)!r}).eval()
        with torch.no_grad():
            loaded = model(**data["inputs"]).logits
            merged = model.merge_and_unload().eval()
            assert not any("lora" in name for name, _ in merged.named_modules())
            merged_logits = merged(**data["inputs"]).logits
        assert "peft_c2a" not in sys.modules
        print(float((loaded - data["expected"]).abs().max()), float((merged_logits - data["expected"]).abs().max()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded_error, merged_error = (float(value) for value in done.stdout.split()[-2:])
    assert loaded_error <= 1e-5 and merged_error <= 1e-5


def test_a_saved_c2a_lora_adapter_loads_back(tmp_path):
    model = c2a_lora("bert", use_context=True)
    model.save_pretrained(tmp_path / "adapter")
    inputs = inputs_for("bert")
    loaded = PeftModel.from_pretrained(base_model("bert"), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(**inputs, label_distribution=[1, 2, 3, 4]).logits
        torch.testing.assert_close(loaded(**inputs, label_distribution=[1, 2, 3, 4]).logits, expected, rtol=0, atol=0)


def test_lora_kind_refuses_what_it_cannot_adapt():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="nn.Linear modules; .*c_attn.* is a Conv1D"):
        get_peft_model(gpt2, peft_c2a.C2AConfig(task_type="CAUSAL_LM", adapter_kind="lora"))
    model = c2a_lora("bert", perturb=False)
    with pytest.raises(ValueError, match="one `adapter_kind`"):
        model.add_adapter("other", peft_c2a.C2AConfig(task_type="SEQ_CLS", bottleneck_dim=4))
    with pytest.raises(ValueError, match="adapter_kind"):
        peft_c2a.C2AConfig(adapter_kind="prefix")
    with pytest.raises(ValueError, match="lora_alpha"):
        peft_c2a.C2AConfig(adapter_kind="lora", lora_alpha=0)


@pytest.mark.parametrize("adapter_kind", ["lora", "bottleneck"])
def test_many_exported_clients_are_served_by_one_model(adapter_kind, tmp_path):
    model = c2a_lora("bert", adapter_kind=adapter_kind)
    inputs = inputs_for("bert")
    clients = {"north": [9, 1, 0, 0], "south": [0, 0, 2, 8]}
    expected = {}
    for name, counts in clients.items():
        model.export_adapter(tmp_path / name, label_distribution=counts)
        with torch.no_grad():
            expected[name] = model(**inputs, label_distribution=counts).logits
    served = PeftModel.from_pretrained(base_model("bert"), tmp_path / "north", adapter_name="north")
    served.load_adapter(tmp_path / "south", adapter_name="south")
    served.eval()
    for name in clients:
        served.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(served(**inputs).logits, expected[name], rtol=0, atol=1e-5)
