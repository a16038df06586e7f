"""Saving, loading and PEFT's adapter-management API with C2A and bottleneck adapters (tiny BERT)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_c2a import BottleneckAdapterConfig, C2AConfig, C2ALayer

from ..conftest import NUM_LABELS
from .test_c2a_properties import DESCRIPTORS, c2a_config, make_non_trivial


def logits(model, batch, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(**batch, **kwargs).logits


@pytest.fixture
def trained_c2a(tiny_bert_pair, batch):
    model, base = tiny_bert_pair
    peft_model = get_peft_model(model, c2a_config(num_clients=4))
    make_non_trivial(peft_model)
    return peft_model, base


def test_save_writes_safetensors_config_and_card(trained_c2a, tmp_path):
    model, _ = trained_c2a
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "C2A" and config["num_labels"] == NUM_LABELS and config["num_clients"] == 4
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    hyper_keys = [k for k in tensors if "c2a_hypernet" in k]
    # the shared hypernetwork is saved once, without the adapter name
    assert hyper_keys and all(k.startswith("base_model.c2a_hypernet.") and ".default." not in k for k in hyper_keys)
    assert len([k for k in tensors if k.endswith("up_basis")]) == 1
    assert not any("LayerNorm" in k or "base_layer" in k for k in tensors)


def test_from_pretrained_reproduces_logits_exactly(trained_c2a, batch, tmp_path):
    model, base = trained_c2a
    kwargs = {"label_distribution": DESCRIPTORS, "client_ids": torch.tensor([0, 1, 2, 3])}
    expected = logits(model, batch, **kwargs)
    model.save_pretrained(tmp_path)

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, C2AConfig) and config.num_clients == 4
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, batch, **kwargs), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference by default"
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.base_model.c2a_hypernet.parameters())
    # PEFT's low_cpu_mem_usage builds the adapter on the meta device and assigns the loaded weights
    low_memory = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*low_memory.parameters(), *low_memory.buffers()])
    assert torch.equal(logits(low_memory, batch, **kwargs), expected)


def test_auto_peft_model_reproduces_logits(tiny_bert, batch, tmp_path):
    tiny_bert.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, c2a_config())
    make_non_trivial(model)
    expected = logits(model, batch, label_distribution=DESCRIPTORS)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch, label_distribution=DESCRIPTORS), expected)


def test_load_under_another_name_and_switch_adapters(trained_c2a, batch, tmp_path):
    model, base = trained_c2a
    kwargs = {"label_distribution": DESCRIPTORS}
    expected_first = logits(model, batch, **kwargs)
    model.save_pretrained(tmp_path / "first")

    other = get_peft_model(copy.deepcopy(base), c2a_config(num_clients=4, bottleneck_dim=6), adapter_name="second")
    make_non_trivial(other, seed=3)
    expected_second = logits(other, batch, **kwargs)
    other.save_pretrained(tmp_path / "second")

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "first", adapter_name="client-a")
    loaded.load_adapter(tmp_path / "second" / "second", adapter_name="client-b")
    assert set(loaded.base_model.c2a_hypernet) == {"client-a", "client-b"}
    assert torch.equal(logits(loaded, batch, **kwargs), expected_first)
    loaded.set_adapter("client-b")
    assert torch.equal(logits(loaded, batch, **kwargs), expected_second)

    loaded.delete_adapter("client-a")
    assert set(loaded.base_model.c2a_hypernet) == {"client-b"}
    assert all("client-a" not in layer.c2a_down_bias for layer in loaded.modules() if isinstance(layer, C2ALayer))
    assert torch.equal(logits(loaded, batch, **kwargs), expected_second)


def test_add_adapter_trains_only_the_active_one(trained_c2a):
    model, _ = trained_c2a
    model.add_adapter("other", c2a_config(num_clients=4))
    hypernets = model.base_model.c2a_hypernet
    assert all(p.requires_grad for p in hypernets["default"].parameters())
    assert not any(p.requires_grad for p in hypernets["other"].parameters())
    model.set_adapter("other")
    assert all(p.requires_grad for p in hypernets["other"].parameters())
    assert not any(p.requires_grad for p in hypernets["default"].parameters())


def test_disable_adapter_gives_the_base_model(trained_c2a, batch):
    model, base = trained_c2a
    adapted = logits(model, batch, label_distribution=DESCRIPTORS)
    with model.disable_adapter():
        disabled = logits(model, batch, label_distribution=DESCRIPTORS)
    base_logits = logits(base, batch)
    # the task head is a trained modules_to_save copy, which disable_adapter also switches back to the original
    assert (disabled - base_logits).abs().max() <= 1e-6
    assert (adapted - base_logits).abs().max() > 1e-4
    assert torch.equal(logits(model, batch, label_distribution=DESCRIPTORS), adapted)


def test_gradient_checkpointing_matches_plain_backward(tiny_bert_pair, batch):
    model, _ = tiny_bert_pair
    grads = {}
    for checkpointing in (False, True):
        peft_model = get_peft_model(copy.deepcopy(model), c2a_config())
        make_non_trivial(peft_model)
        if checkpointing:
            inner = peft_model.base_model.model
            if hasattr(inner, "activation_checkpointing_enable"):  # the name since transformers 5.24
                peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                assert inner.is_activation_checkpointing
            else:
                peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                assert inner.is_gradient_checkpointing
        peft_model.train()
        out = peft_model(**batch, labels=torch.tensor([0, 1, 2, 0]), label_distribution=DESCRIPTORS)
        out.loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_gradient_checkpointing_is_refused_with_the_fix(tiny_bert_pair, batch):
    model, _ = tiny_bert_pair
    peft_model = get_peft_model(model, c2a_config())
    inner = peft_model.base_model.model
    if hasattr(inner, "activation_checkpointing_enable"):
        peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model.train()
    with pytest.raises(ValueError, match="reentrant activation checkpointing.*'use_reentrant': False"):
        peft_model(**batch, labels=torch.tensor([0, 1, 2, 0]), label_distribution=DESCRIPTORS)
    # in eval mode (no gradients) checkpointing does not run, and the model answers
    peft_model.eval()
    with torch.no_grad():
        assert peft_model(**batch, label_distribution=DESCRIPTORS).logits.shape == (4, NUM_LABELS)


def test_bf16_autocast_on_cpu(trained_c2a, batch):
    model, _ = trained_c2a
    descriptor = {"label_distribution": DESCRIPTORS, "client_ids": torch.tensor([0, 1, 2, 3])}
    full = logits(model, batch, **descriptor)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=torch.tensor([0, 1, 2, 0]), **descriptor)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    hyper = model.base_model.c2a_hypernet["default"]
    assert hyper.up_basis.grad is not None and hyper.up_basis.grad.dtype == torch.float32
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch, **descriptor).logits
    assert (low.float() - full).abs().max() < 0.1


def test_bottleneck_save_load_roundtrip(tiny_bert_pair, batch, tmp_path):
    model, base = tiny_bert_pair
    peft_model = get_peft_model(model, BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=4))
    make_non_trivial(peft_model)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, batch), expected)


def test_push_to_hub_goes_through_peft_and_uploads_the_adapter(trained_c2a, monkeypatch):
    """The Hub is unreachable here: intercept `huggingface_hub` at its API boundary and check what would be sent."""
    import huggingface_hub

    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["repo"] = repo_id
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        sent["files"] = {}
        for op in operations:
            path = op.path_or_fileobj
            sent["files"][op.path_in_repo] = open(path, "rb").read() if isinstance(path, str) else path.read()
        return types.SimpleNamespace(commit_url="local://commit")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model, _ = trained_c2a
    model.push_to_hub("someone/c2a-tiny")
    assert sent["repo"] == "someone/c2a-tiny"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(sent["files"])
    assert json.loads(sent["files"]["adapter_config.json"])["peft_type"] == "C2A"
    from safetensors.torch import load

    uploaded = load(sent["files"]["adapter_model.safetensors"])
    hyper = model.base_model.c2a_hypernet["default"]
    assert torch.equal(uploaded["base_model.c2a_hypernet.up_basis"], hyper.up_basis.detach())


@pytest.mark.slow
def test_loading_without_import_fails_and_with_import_works(trained_c2a, tmp_path):
    model, _ = trained_c2a
    model.save_pretrained(tmp_path)
    code = "from peft import PeftConfig; import sys; PeftConfig.from_pretrained(sys.argv[1])"
    bare = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert bare.returncode != 0 and "KeyError: 'C2A'" in bare.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import peft_c2a; " + code + "; print('ok')", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0 and imported.stdout.strip() == "ok", imported.stderr


def test_corrupt_adapter_file_raises_and_model_is_unchanged(trained_c2a, tmp_path):
    model, base = trained_c2a
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    target = copy.deepcopy(base)
    originals = [(param, param.detach().clone()) for param in target.parameters()]
    with pytest.raises(Exception, match="(?i)safetensor|header|deserializ") as error:
        PeftModel.from_pretrained(target, tmp_path)
    assert "header" in str(error.value)
    # PEFT injects the layers before it reads the weights; the base weights themselves are untouched
    assert all(torch.equal(param, copy_) for param, copy_ in originals)


def test_loading_into_a_base_with_other_labels_sizes_its_head(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    from ..conftest import tiny_bert_config

    encoder = {k: v.clone() for k, v in tiny_bert.state_dict().items() if not k.startswith("classifier")}
    saved = get_peft_model(tiny_bert, C2AConfig(task_type="SEQ_CLS", num_labels=NUM_LABELS, bottleneck_dim=4))
    saved.save_pretrained(tmp_path)
    two_labels = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    two_labels.load_state_dict(encoder, strict=False)  # the same encoder under a 2-label head
    loaded = PeftModel.from_pretrained(two_labels, tmp_path)
    assert loaded.peft_config["default"].num_labels == NUM_LABELS and loaded.config.num_labels == NUM_LABELS
    input_ids = torch.randint(1, 50, (2, 6))
    saved.eval()
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, saved(input_ids=input_ids).logits, rtol=0, atol=0)
