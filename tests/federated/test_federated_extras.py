"""Mixed precision in local training, bytes of the baselines, resume identity checks, and crash leftovers."""

from __future__ import annotations

import pytest
import torch
from transformers import default_data_collator

from peft_c2a.federated import CheckpointError, FederatedTrainer
from peft_c2a.federated.checkpoint import remove_stale_temporaries

from ..federated_utils import fed_args, make_trainer, skewed_clients, tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class AutocastSpy(FederatedTrainer):
    """Records whether CPU autocast was on, and in which dtype, at every loss computation."""

    seen: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append((model.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocasts_local_training_and_evaluation(tmp_path, bf16):
    # the model is never passed through accelerator.prepare, so autocast must come from the trainer itself
    clients, tests = skewed_clients(num_clients=2, size=8, eval_size=4)
    trainer = AutocastSpy(tiny_model("c2a"), fed_args(tmp_path, num_rounds=1, bf16=bf16), clients, tests)
    trainer.seen = []
    trainer.train()
    training = [entry for entry in trainer.seen if entry[0]]
    evaluation = [entry for entry in trainer.seen if not entry[0]]
    assert training and evaluation
    for _, enabled, dtype in trainer.seen:
        assert enabled is bf16
        if bf16:
            assert dtype == torch.bfloat16
    assert all(torch.isfinite(t).all() for t in trainer.get_trainable_state().values())


@pytest.mark.parametrize("mode", ["local", "centralized"])
def test_baselines_send_no_bytes(tmp_path, mode):
    trainer = make_trainer(tmp_path, num_rounds=1, federation_mode=mode)
    trainer.train()
    record = trainer.history[-1]
    assert record["bytes_up"] == record["bytes_down"] == record["bytes_up_per_client"] == 0


def test_federated_bytes_are_the_trainable_tensors(tmp_path):
    trainer = make_trainer(tmp_path, num_rounds=1, clients_per_round=3)
    per_client = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    record = trainer.history[-1]
    assert record["bytes_down"] == record["bytes_up"] == 3 * per_client
    assert record["bytes_up_per_client"] == per_client


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 1}, "seed"),
        ({"client_sampling_seed": 7}, "client_sampling_seed"),
        ({"clients_per_round": 2}, "clients_per_round"),
    ],
)
def test_resume_refuses_a_run_that_would_sample_differently(tmp_path, change, field):
    make_trainer(tmp_path, num_rounds=1, clients_per_round=3, save_every_rounds=1).train()
    settings = {"num_rounds": 2, "clients_per_round": 3, "save_every_rounds": 1, **change}
    trainer = make_trainer(tmp_path, **settings)
    before = trainer.get_trainable_state()
    with pytest.raises(CheckpointError, match=field):
        trainer.train(resume_from_checkpoint=True)
    after = trainer.get_trainable_state()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not (tmp_path / "round-2").exists()


def test_half_written_checkpoints_are_removed_and_wall_time_continues(tmp_path):
    make_trainer(tmp_path, num_rounds=1, save_every_rounds=1).train()
    leftovers = [tmp_path / ".round-2.tmp-12345", tmp_path / ".round-2.stale-999"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "trainable_state.safetensors").write_bytes(b"partial")
    unrelated = tmp_path / ".round-2.tmp-notapid"
    unrelated.mkdir()
    trainer = make_trainer(tmp_path, num_rounds=2, save_every_rounds=1)
    trainer.train(resume_from_checkpoint=True)
    assert not any(folder.exists() for folder in leftovers)
    assert unrelated.exists()  # only names this package writes are removed
    rounds = [record["round"] for record in trainer.history]
    assert rounds == [1, 2]
    assert trainer.history[1]["wall_time"] >= trainer.history[0]["wall_time"]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_evaluate_client_with_own_and_uniform_descriptor(tmp_path):
    # the uniform pass is exactly the global evaluation restricted to this client's test set; the own-descriptor
    # pass is the personalised score, and for C2A the two differ
    clients, tests = skewed_clients()
    trainer = FederatedTrainer(
        tiny_model("c2a"),
        fed_args(tmp_path, num_rounds=1, local_max_steps=3, learning_rate=2e-2),
        clients,
        tests,
        eval_dataset=tests["client-1"],
        data_collator=default_data_collator,
    )
    trainer.train()
    report = trainer.evaluate_federation()
    uniform = trainer.evaluate_client("client-1", own_descriptor=False)
    own = trainer.evaluate_client("client-1")
    assert uniform["loss"] == pytest.approx(report["eval_global_loss"], abs=1e-7)
    assert uniform["accuracy"] == report["eval_global_accuracy"]
    assert own == pytest.approx(report["eval_clients"]["client-1"])
    assert own["loss"] != pytest.approx(uniform["loss"])
    with pytest.raises(ValueError, match="no evaluation dataset"):
        FederatedTrainer(
            tiny_model("c2a"), fed_args(tmp_path / "b"), clients, data_collator=default_data_collator
        ).evaluate_client("client-0")
