"""Client-private tensors (C2A's client-id embedding) stay with their client: never sent, never averaged, used for the
client's own evaluation, checkpointed and resumed exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from peft_c2a.federated import state_nbytes
from peft_c2a.federated.rounds import private_parameter_names

from ..federated_utils import make_trainer, skewed_clients, tiny_model

NUM_CLIENTS = 4
EMBEDDING = "base_model.c2a_hypernet.default.client_embedding"


def id_trainer(tmp_path, **overrides):
    clients, evals = skewed_clients(NUM_CLIENTS)
    settings = dict(clients_per_round=NUM_CLIENTS, num_rounds=1, local_max_steps=2, learning_rate=2e-2)
    settings.update(overrides)
    return make_trainer(
        tmp_path, clients=clients, eval_clients=evals, model=tiny_model("c2a", num_clients=NUM_CLIENTS), **settings
    )


def test_only_the_client_id_embedding_is_private():
    assert private_parameter_names(tiny_model("c2a", num_clients=3)) == {EMBEDDING}
    assert private_parameter_names(tiny_model("c2a")) == frozenset()
    assert private_parameter_names(tiny_model("bottleneck")) == frozenset()


def test_client_embedding_never_travels_and_each_client_keeps_its_own_row(tmp_path):
    trainer = id_trainer(tmp_path / "fed")
    initial = trainer.get_trainable_state()[EMBEDDING].clone()
    trainer.train()
    record = trainer.history[-1]

    assert EMBEDDING not in trainer.global_state
    assert record["bytes_up_per_client"] == state_nbytes(trainer.global_state)  # the embedding is not uploaded
    assert record["bytes_down"] == NUM_CLIENTS * state_nbytes(trainer.global_state)
    # the model (the global state) keeps the initial table; each client its own trained row
    assert torch.equal(trainer.get_trainable_state()[EMBEDDING], initial)
    for name, client in trainer.clients.items():
        own = trainer.client_private_states[name][EMBEDDING]
        others = [row for row in range(NUM_CLIENTS) if row != client.client_id]
        assert not torch.equal(own[client.client_id], initial[client.client_id]), name
        assert torch.equal(own[others], initial[others]), name

    # the row is the client's whole local update, not n_k / sum(n) of it: exactly what training alone gives
    local = id_trainer(tmp_path / "local", federation_mode="local")
    local.train()
    for name, client in trainer.clients.items():
        row = client.client_id
        torch.testing.assert_close(
            trainer.client_private_states[name][EMBEDDING][row], local.client_states[name][EMBEDDING][row]
        )


def test_a_client_is_evaluated_with_its_own_embedding(tmp_path):
    trainer = id_trainer(tmp_path, num_rounds=3, local_max_steps=5, learning_rate=5e-2)
    trainer.train()
    scores = trainer.history[-1]["eval_clients"]
    for name in trainer.clients:
        trainer.load_trainable_state(trainer.client_state(name, trainer.global_state))
        own = trainer.evaluate_client(name)["loss"]
        trainer.load_trainable_state(trainer.client_state(None, trainer.global_state))
        initial = trainer.evaluate_client(name)["loss"]
        assert own == pytest.approx(scores[name]["loss"], abs=1e-7)
        assert abs(own - initial) > 1e-5, name


def test_private_states_are_checkpointed_and_resumed_exactly(tmp_path):
    straight = id_trainer(tmp_path / "straight", num_rounds=3, clients_per_round=2, save_every_rounds=1)
    straight.train()

    first = id_trainer(tmp_path / "resumed", num_rounds=3, clients_per_round=2, save_every_rounds=1)
    first.train()
    for later in ("round-2", "round-3"):
        shutil.rmtree(tmp_path / "resumed" / later)
    resumed = id_trainer(tmp_path / "resumed", num_rounds=3, clients_per_round=2, save_every_rounds=1)
    resumed.train(resume_from_checkpoint=True)

    assert set(resumed.client_private_states) == set(straight.client_private_states)
    for name, state in straight.client_private_states.items():
        assert torch.equal(resumed.client_private_states[name][EMBEDDING], state[EMBEDDING]), name
    for key, value in straight.global_state.items():
        assert torch.equal(resumed.global_state[key], value), key
