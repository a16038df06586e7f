"""The Flower engine runs the same federation as `FederatedTrainer`: real `run_simulation` with Ray, tiny models."""

from __future__ import annotations

import json
import os

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

import cloudpickle  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from peft_c2a.federated import CheckpointError, FederatedTrainer  # noqa: E402
from peft_c2a.flower import FederatedStrategy  # noqa: E402

from .. import federated_utils, flower_utils  # noqa: E402
from ..federated_utils import fed_args, skewed_clients, tiny_model  # noqa: E402
from ..flower_utils import NUM_NODES, federation_settings  # noqa: E402

# Ray's workers cannot import the test package: ship these modules by value
cloudpickle.register_pickle_by_value(flower_utils)
cloudpickle.register_pickle_by_value(federated_utils)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

pytestmark = pytest.mark.slow
C2A_WITH_IDS = (("num_clients", NUM_NODES),)  # a client-id embedding: the server must send each client its id


def simulate(client_app, server_app) -> None:
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )


def run_flower(output_dir, resume=None, **settings) -> dict:
    sink: dict = {}
    simulate(
        flower_utils.client_app(str(output_dir), overrides=C2A_WITH_IDS, **settings),
        flower_utils.server_app(str(output_dir), sink, overrides=C2A_WITH_IDS, resume=resume, **settings),
    )
    assert "strategy" in sink, "the ServerApp did not finish (see the log above)"
    return sink


def reference_trainer(output_dir, method="c2a", overrides=(), unseen=(), **settings) -> FederatedTrainer:
    """FederatedTrainer over the same three clients, settings and seed as the Flower runs."""
    torch.set_num_threads(1)
    train, test = skewed_clients(NUM_NODES)
    trainer = FederatedTrainer(
        tiny_model(method, seed=0, **dict(overrides)),
        fed_args(output_dir, **federation_settings(**settings)),
        train,
        test,
        unseen_clients=list(unseen),
        data_collator=default_data_collator,
    )
    trainer.train()
    return trainer


def assert_states_close(actual, expected, atol=1e-6):
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key].double(), expected[key].double(), rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("flower")
    return output_dir, run_flower(output_dir)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    return reference_trainer(tmp_path_factory.mktemp("trainer"), overrides=C2A_WITH_IDS)


def test_simulation_equals_federated_trainer(flower_run, trainer_run):
    output_dir, sink = flower_run
    strategy: FederatedStrategy = sink["strategy"]
    assert strategy.training_clients == sorted(trainer_run.clients)
    # the client-id embedding stays on the nodes, as it stays with the trainer's clients
    assert not [key for key in strategy.global_state if key.endswith("client_embedding")]
    assert_states_close(strategy.global_state, trainer_run.global_state)
    for flower_record, trainer_record in zip(strategy.history, trainer_run.history, strict=True):
        assert flower_record["sampled_clients"] == trainer_record["sampled_clients"]
        assert len(flower_record["sampled_clients"]) == 2
        assert flower_record["train_loss"] == pytest.approx(trainer_record["train_loss"], abs=1e-6)
        assert flower_record["client_train_loss"] == pytest.approx(trainer_record["client_train_loss"], abs=1e-6)
        for key in ("bytes_down", "bytes_up", "bytes_up_per_client", "num_train_examples", "local_steps"):
            assert flower_record[key] == trainer_record[key], key
        # personalised scores: each client with its own descriptor, on its own test set
        for name, scores in trainer_record["eval_clients"].items():
            assert flower_record["eval_clients"][name]["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-6)
    # Flower's own result carries the same final state
    final = {key: torch.as_tensor(value.numpy()) for key, value in sink["result"].arrays.items()}
    assert_states_close(final, trainer_run.global_state, atol=0)


def test_lora_on_flower_equals_trainer_and_only_updates_and_counts_leave_clients(tmp_path):
    # any PEFT model federates on Flower, and the wire carries exactly what docs/flower.md lists
    # client-2 is unseen (evaluated, never trained), and every round needs both training clients: the nodes build
    # their trainers from the same arguments, min_clients_per_round=2 included
    settings = dict(num_rounds=2, min_clients_per_round=2)
    log_path = tmp_path / "wire.jsonl"
    sink: dict = {}
    simulate(
        flower_utils.recording_client_app(str(tmp_path / "flower"), str(log_path), method="lora", **settings),
        flower_utils.server_app(str(tmp_path / "flower"), sink, method="lora", unseen=("client-2",), **settings),
    )
    reference = reference_trainer(tmp_path / "trainer", method="lora", unseen=("client-2",), **settings)
    strategy = sink["strategy"]
    assert_states_close(strategy.global_state, reference.global_state)
    assert strategy.training_clients == ["client-0", "client-1"]
    for flower_record, trainer_record in zip(strategy.history, reference.history, strict=True):
        assert flower_record["sampled_clients"] == ["client-0", "client-1"]
        assert list(flower_record["eval_unseen_clients"]) == ["client-2"]
        assert flower_record["eval_unseen_mean_accuracy"] == pytest.approx(
            trainer_record["eval_unseen_mean_accuracy"], abs=1e-6
        )
        assert "eval_failed_clients" not in flower_record

    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    by_type: dict = {}
    for entry in entries:
        by_type.setdefault(entry["type"], []).append(entry)
    assert len(by_type["query"]) == NUM_NODES
    assert len(by_type["train"]) == 2 * 2  # 2 sampled clients x 2 rounds
    assert len(by_type["evaluate"]) == 2 * NUM_NODES  # every node, every round (eval_every_rounds=1)
    for entry in by_type["query"]:
        assert entry == {
            "type": "query",
            "arrays": {},
            "configs": {"clients": ["names", "num-examples", "num-test-examples", "seed"]},
            "metrics": {},
        }
    trainable = sorted(reference.global_state)
    for entry in by_type["train"]:
        assert sorted(entry["arrays"]["arrays"]) == trainable  # the update: trainable tensors only
        assert entry["configs"] == {"config": ["client", "error", "status"]}
        assert entry["metrics"] == {"metrics": ["local-steps", "num-examples", "train-loss"]}
    for entry in by_type["evaluate"]:
        assert entry["arrays"] == {} and entry["configs"] == {}
        # LoRA has no descriptor: one scoring pass per client (a uniform-descriptor pass would be identical)
        (key,) = entry["metrics"]
        assert key.startswith("own/client-")
        assert entry["metrics"][key] == ["accuracy", "loss", "macro_f1", "num_examples"]


def test_plain_bottleneck_on_flower_equals_trainer(tmp_path):
    # this package's non-C2A adapter: no descriptor, one scoring pass per client, same algorithm as the trainer
    settings = dict(num_rounds=2)
    sink: dict = {}
    simulate(
        flower_utils.client_app(str(tmp_path / "flower"), method="bottleneck", **settings),
        flower_utils.server_app(str(tmp_path / "flower"), sink, method="bottleneck", **settings),
    )
    reference = reference_trainer(tmp_path / "trainer", method="bottleneck", **settings)
    strategy = sink["strategy"]
    assert_states_close(strategy.global_state, reference.global_state)
    for flower_record, trainer_record in zip(strategy.history, reference.history, strict=True):
        assert flower_record["sampled_clients"] == trainer_record["sampled_clients"]
        assert flower_record["train_loss"] == pytest.approx(trainer_record["train_loss"], abs=1e-6)


def test_simulation_learns_and_writes_history_checkpoints_and_adapter(flower_run):
    output_dir, sink = flower_run
    history = sink["strategy"].history
    assert [record["round"] for record in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["eval_personalized_mean_loss"] < history[0]["eval_personalized_mean_loss"]
    # round 1 already has each client's prior through the logit adjustment; the rounds must add to it
    assert history[-1]["eval_personalized_mean_accuracy"] > history[0]["eval_personalized_mean_accuracy"] + 0.1
    # the prior-only reference describes a client's labels: nodes keep it (the trainer, holding the data, reports it)
    assert not [key for record in history for key in record if "prior_only" in key]
    assert not [
        key for record in history for scores in record["eval_clients"].values() for key in scores if "prior" in key
    ]
    assert 0.0 <= history[-1]["eval_global_accuracy"] <= 1.0
    assert history[-1]["eval_personalized_num_clients"] == NUM_NODES
    written = json.loads((output_dir / "history.json").read_text())
    assert [record["round"] for record in written] == [1, 2, 3]
    assert (output_dir / "round-3" / "adapter_model.safetensors").is_file()
    assert (output_dir / "round-3" / "checkpoint_manifest.json").is_file()


def test_resume_continues_exactly(tmp_path):
    # FedAdam (server optimizer moments must be restored) and evaluation every 2 rounds (round 2 is not evaluated
    # when the federation has 3 rounds, but is when it stops after 2: the checkpoint must not care)
    settings = dict(aggregation="fedadam", server_learning_rate=0.05, eval_every_rounds=2)
    first = run_flower(tmp_path, num_rounds=2, **settings)  # the same federation, stopped after round 2
    assert [record["round"] for record in first["strategy"].history] == [1, 2]
    resumed = run_flower(tmp_path, resume=True, **settings)
    strategy = resumed["strategy"]
    assert [record["round"] for record in strategy.history] == [1, 2, 3]
    # rounds 1-2 were restored from the checkpoint, not redone (their timings are the first run's)
    assert strategy.history[:2] == first["strategy"].history
    reference = reference_trainer(tmp_path / "trainer", overrides=C2A_WITH_IDS, **settings)
    assert_states_close(strategy.global_state, reference.global_state)
    assert reference.server_optimizer.state_dict().keys() == strategy.server_optimizer.state_dict().keys()


def test_hostile_updates_are_rejected_and_never_averaged(tmp_path):
    # node 2 sends NaN (round 1), a misshapen tensor (round 2) and an inflated example count (round 3); the global
    # state must stay the FedAvg of the honest clients, i.e. what FederatedTrainer computes over clients 0 and 1 alone
    settings = dict(clients_per_round=3, num_rounds=3)
    sink: dict = {}
    simulate(
        flower_utils.hostile_client_app(str(tmp_path / "flower"), **settings),
        flower_utils.server_app(str(tmp_path / "flower"), sink, **settings),
    )
    strategy = sink["strategy"]
    first, second, third = strategy.history
    assert list(first["rejected_clients"]) == ["client-2"] and "non-finite" in first["rejected_clients"]["client-2"]
    assert (
        list(second["rejected_clients"]) == ["client-2"]
        and "global state has" in second["rejected_clients"]["client-2"]
    )
    assert list(third["rejected_clients"]) == ["client-2"] and "example count" in third["rejected_clients"]["client-2"]
    assert [record["num_clients_ok"] for record in strategy.history] == [2, 2, 2]
    for record in strategy.history:  # its inflated test-set size is refused; the honest clients still count
        assert list(record["eval_failed_clients"]) == ["client-2"]
        assert "10000.0 examples scored, " in record["eval_failed_clients"]["client-2"]
    train, test = skewed_clients(NUM_NODES)
    for record in strategy.history:
        assert record["eval_global_num_examples"] == sum(len(test[name]) for name in ("client-0", "client-1"))
    honest = {name: train[name] for name in ("client-0", "client-1")}
    reference = FederatedTrainer(
        tiny_model("c2a", seed=0),
        fed_args(tmp_path / "reference", **federation_settings(**settings)),
        honest,
        data_collator=default_data_collator,
    )
    reference.train()
    assert_states_close(strategy.global_state, reference.global_state)


def test_strategy_checks_its_input(tmp_path):
    model = tiny_model("c2a")
    with pytest.raises(ValueError, match="federation_mode='local'"):
        FederatedStrategy(model, fed_args(tmp_path, federation_mode="local"))
    strategy = FederatedStrategy(model, fed_args(tmp_path, **federation_settings()))
    strategy.register_clients({1: describe(["client-0", "client-1"])})
    strategy.save_checkpoint(1)
    other = FederatedStrategy(tiny_model("c2a"), fed_args(tmp_path, **federation_settings(seed=1)))
    other.register_clients({1: describe(["client-0", "client-1"], seed=1)})
    with pytest.raises(CheckpointError, match="seed"):
        other.load_checkpoint(tmp_path / "round-1")
    bottleneck = FederatedStrategy(tiny_model("bottleneck"), fed_args(tmp_path, **federation_settings()))
    bottleneck.register_clients({1: describe(["client-0", "client-1"])})
    with pytest.raises(CheckpointError, match="does not fit"):
        bottleneck.load_checkpoint(tmp_path / "round-1")
    (tmp_path / "round-1" / "trainable_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        strategy.load_checkpoint(tmp_path / "round-1")


def describe(names, counts=None, seed=0):
    counts = counts or [24] * len(names)
    return {"names": names, "num-examples": counts, "num-test-examples": [8] * len(names), "seed": seed}


def test_client_registration_refuses_inconsistent_federations(tmp_path):
    args = fed_args(tmp_path, **federation_settings())
    strategy = FederatedStrategy(tiny_model("c2a", num_clients=2), args, unseen_clients=["client-9"])
    with pytest.raises(ValueError, match="held by two nodes"):
        strategy.register_clients({1: describe(["client-0"]), 2: describe(["client-0", "client-9"])})
    with pytest.raises(ValueError, match="seed 1"):
        strategy.register_clients({1: describe(["client-0", "client-9"]), 2: describe(["client-1"], seed=1)})
    with pytest.raises(ValueError, match="no node holds: \\['client-9'\\]"):
        strategy.register_clients({1: describe(["client-0"]), 2: describe(["client-1"])})
    with pytest.raises(ValueError, match="embeds 2 client ids"):  # client ids would fall outside the embedding
        strategy.register_clients({1: describe(["client-0", "client-9"]), 2: describe(["client-1"])})
    with pytest.raises(ValueError, match="min_clients_per_round=3"):
        FederatedStrategy(tiny_model("c2a"), fed_args(tmp_path, min_clients_per_round=3)).register_clients(
            {1: describe(["client-0", "client-1"])}
        )
    fine = FederatedStrategy(tiny_model("c2a", num_clients=3), args, unseen_clients=["client-9"])
    fine.register_clients({7: describe(["client-9", "client-0"]), 3: describe(["client-1"])})
    assert fine.training_clients == ["client-0", "client-1"]
    assert fine.client_nodes == {"client-0": 7, "client-9": 7, "client-1": 3}
    assert fine.client_ids == {"client-0": 0, "client-1": 1, "client-9": 2}  # FederatedTrainer's numbering
