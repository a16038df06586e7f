"""`FederatedTrainer.export_client_adapters` writes each client's personalised adapter: a static folder per client
that reproduces the federated C2A model's outputs for that client, with a card of its descriptor and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import BertForSequenceClassification

from ..conftest import tiny_bert_config
from ..federated_utils import tiny_model
from .test_federated_trainer import build, make_clients


def fresh_base() -> BertForSequenceClassification:
    torch.manual_seed(0)  # tiny_model's base
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.mark.parametrize(("num_clients", "adapter_kind"), [(None, "bottleneck"), (3, "bottleneck"), (3, "lora")])
def test_every_clients_exported_adapter_reproduces_its_personalised_outputs(tmp_path, num_clients, adapter_kind):
    clients, evals = make_clients({"client/a": 10, "client-b": 12, "new one": 8}, eval_size=5)
    model = tiny_model("c2a", use_context=False, num_clients=num_clients, adapter_kind=adapter_kind)
    trainer = build(tmp_path / "run", clients, evals, model=model, num_rounds=2, unseen_clients=["new one"])
    trainer.train()
    folders = trainer.export_client_adapters()
    assert {name: path.name for name, path in folders.items()} == {
        "client/a": "client_a",
        "client-b": "client-b",
        "new one": "new_one",
    }
    global_state = {key: value.clone() for key, value in trainer.get_trainable_state().items()}
    batch = {key: torch.tensor(evals["client-b"][key]) for key in ("input_ids", "attention_mask")}
    for name, folder in folders.items():
        client = trainer.clients[name]
        own = name in trainer.training_clients
        trainer.load_trainable_state(trainer.client_state(name if own else None, trainer.global_state))
        descriptor = {"label_distribution": client.label_counts.tolist()}
        if num_clients and own:
            descriptor["client_ids"] = client.client_id
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(**batch, **descriptor).logits
            loaded = PeftModel.from_pretrained(fresh_base(), folder).eval()
            assert loaded.peft_config["default"].peft_type == ("LORA" if adapter_kind == "lora" else "BOTTLENECK")
            torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)
        card = (folder / "README.md").read_text()
        assert f"client `{name}`" in card
        for count in client.label_counts:
            assert f"| {int(count)} |" in card
        last = trainer.history[-1]["eval_unseen_clients" if not own else "eval_clients"][name]
        assert f"| accuracy | {last['accuracy']:.4f} |" in card
    # the model holds the global state again
    trainer.load_trainable_state(global_state)
    assert all(np.isfinite(value.numpy()).all() for value in global_state.values())


def test_export_needs_a_c2a_model_without_context_and_known_clients(tmp_path):
    clients, evals = make_clients({"a": 6, "b": 6}, eval_size=3)
    lora = build(tmp_path / "lora", clients, evals, method="lora")
    with pytest.raises(TypeError, match="needs a C2A model"):
        lora.export_client_adapters()
    with_context = build(tmp_path / "c2a", clients, evals)
    with_context.train()
    with pytest.raises(ValueError, match="use_context=False"):
        with_context.export_client_adapters()
    no_context = build(tmp_path / "c2a-nc", clients, evals, model=tiny_model("c2a", use_context=False))
    with pytest.raises(RuntimeError, match=r"run `train\(\)`"):
        no_context.export_client_adapters()
    with pytest.raises(ValueError, match="Unknown clients"):
        no_context.export_client_adapters(clients=["zzz"])
