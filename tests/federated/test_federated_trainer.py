"""Behaviour of `FederatedTrainer` on tiny random BERT federations: learning, FedAvg maths, sampling, every PEFT
method, descriptors, Trainer pitfalls (dropped columns, gradient accumulation, optimizer reuse), FedProx/FedAdam,
baselines, metrics and output files, and faults."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PromptTuningConfig, get_peft_model
from transformers import BertForSequenceClassification, TrainingArguments, default_data_collator

import peft_c2a
import peft_c2a.federated.server as server_module
from peft_c2a.federated import FedAdamServer, FederatedTrainer, FederatedTrainingArguments, state_nbytes
from peft_c2a.federated.metrics import write_history

from ..conftest import NUM_LABELS, tiny_bert_config
from ..federated_utils import fed_args, skewed_clients, tiny_model, token_dataset

POOLS = ([0, 1], [1, 2], [2, 0])


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """One intra-op thread (tiny matmuls are far faster without thread hand-offs, especially on a busy machine), and
    no PNG per round except in the test that checks the plot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            server_module, "write_history", lambda history, output_dir: write_history(history, output_dir, False)
        )
        yield
    torch.set_num_threads(threads)


# ---- helpers -------------------------------------------------------------------------------------------------------


def make_clients(sizes: Mapping[str, int], seed: int = 0, eval_size: int = 0):
    """Clients of the given sizes, each holding two of the three labels; optional own test sets of the same mix."""
    train, test = {}, {}
    for i, (name, size) in enumerate(sizes.items()):
        pool = POOLS[i % len(POOLS)]
        train[name] = token_dataset(size, seed * 1000 + i, pool)
        if eval_size:
            test[name] = token_dataset(eval_size, seed * 1000 + 500 + i, pool)
    return train, (test or None)


def build(tmp_path, clients, eval_clients=None, method="c2a", model=None, cls=FederatedTrainer, **kwargs):
    trainer_kwargs = {key: kwargs.pop(key) for key in ("eval_dataset", "unseen_clients", "optimizers") if key in kwargs}
    kwargs.setdefault("num_rounds", 1)
    return cls(
        model if model is not None else tiny_model(method),
        fed_args(tmp_path, **kwargs),
        clients,
        eval_clients,
        data_collator=default_data_collator,
        **trainer_kwargs,
    )


def prompt_model(seed: int = 0):
    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    return get_peft_model(BertForSequenceClassification(tiny_bert_config()), config)


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def weighted_mean(states: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]):
    total = sum(weights.values())
    names = next(iter(states.values())).keys()
    return {key: sum(weights[c] * states[c][key].double() for c in states) / total for key in names}


def norm_of_difference(a, b) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def assert_states_close(actual, expected, atol=1e-6):
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key].double(), expected[key].double(), rtol=0, atol=atol, msg=key)


def own_descriptor(dataset) -> torch.Tensor:
    counts = np.bincount(np.asarray(dataset["labels"]), minlength=NUM_LABELS)
    return torch.tensor(counts / counts.sum(), dtype=torch.float32)


def evaluate_by_hand(model, dataset, descriptor=None) -> dict[str, float]:
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("labels")
    extra = {} if descriptor is None else {"label_distribution": descriptor.expand(len(labels), -1)}
    model.eval()
    with torch.no_grad():
        logits = model(**batch, **extra).logits
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
    }


class SpyTrainer(FederatedTrainer):
    """Records a copy of every training batch that reaches `compute_loss`."""

    def __init__(self, *args, **kwargs):
        self.seen: list[dict] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


# ---- learning ------------------------------------------------------------------------------------------------------


def test_c2a_federation_learns(tmp_path):
    clients, eval_clients = skewed_clients()
    trainer = build(tmp_path, clients, eval_clients, num_rounds=8, learning_rate=2e-2, local_max_steps=3)
    untrained = trainer.evaluate_federation()
    output = trainer.train()

    accuracies = [record["eval_personalized_mean_accuracy"] for record in trainer.history]
    losses = [record["train_loss"] for record in trainer.history]
    # the logit adjustment gives an untrained C2A model the prior-only guess (each client's majority label); the
    # federation must learn beyond it
    prior_only = untrained["eval_personalized_mean_prior_only_accuracy"]
    assert untrained["eval_personalized_mean_accuracy"] == pytest.approx(prior_only)
    assert accuracies[-1] > accuracies[0]
    assert accuracies[-1] >= 0.9 > prior_only > 1 / NUM_LABELS
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert output.global_step == 8
    assert output.training_loss == pytest.approx(float(np.mean(losses)))
    # as the Trainer's: the metrics' train_loss is the run's, the last round's has its own key
    assert (
        output.metrics["train_loss"] == output.training_loss and output.metrics["last_round_train_loss"] == losses[-1]
    )


# ---- FedAvg maths and the local-only baseline -----------------------------------------------------------------------

FEDAVG_SIZES = {"client-a": 5, "client-b": 11, "client-c": 20}


@pytest.fixture(scope="module")
def local_and_fedavg(tmp_path_factory):
    """Round 1 of the same three clients (sizes 5, 11, 20) in local-only mode and in FedAvg mode."""
    clients, eval_clients = make_clients(FEDAVG_SIZES, eval_size=6)
    local = build(tmp_path_factory.mktemp("local"), clients, eval_clients, federation_mode="local")
    initial = local.get_trainable_state()
    local.train()
    fedavg = build(tmp_path_factory.mktemp("fedavg"), clients, eval_clients)
    assert_states_close(fedavg.get_trainable_state(), initial, atol=0)
    fedavg.train()
    return local, fedavg, initial, eval_clients


def test_fedavg_global_is_example_weighted_mean_of_client_states(local_and_fedavg):
    local, fedavg, initial, _ = local_and_fedavg
    expected = weighted_mean(local.client_states, FEDAVG_SIZES)
    assert_states_close(fedavg.global_state, expected, atol=1e-6)
    assert_states_close(fedavg.get_trainable_state(), fedavg.global_state, atol=0)  # the model holds the global state
    # the weights matter: the unweighted mean is measurably different
    unweighted = weighted_mean(local.client_states, dict.fromkeys(FEDAVG_SIZES, 1.0))
    assert norm_of_difference(unweighted, expected) > 100 * 1e-6
    assert norm_of_difference(fedavg.global_state, initial) > 1e-3
    record = fedavg.history[0]
    assert record["num_train_examples"] == 36
    assert record["sampled_clients"] == sorted(FEDAVG_SIZES)
    assert record["local_steps"] == 1 + 2 + 3  # ceil(size / 8) batches each


def test_local_mode_keeps_global_and_one_state_per_client(local_and_fedavg):
    local, _, initial, eval_clients = local_and_fedavg
    assert_states_close(local.global_state, initial, atol=0)
    assert_states_close(local.get_trainable_state(), initial, atol=0)
    assert sorted(local.client_states) == sorted(FEDAVG_SIZES)
    for state in local.client_states.values():
        assert norm_of_difference(state, initial) > 1e-3
    record = local.history[0]
    assert record["bytes_down"] == record["bytes_up"] == record["bytes_up_per_client"] == 0
    assert "eval_global_accuracy" not in record
    # personalised evaluation uses each client's own state and descriptor
    name = "client-b"
    local.load_trainable_state(local.client_states[name])
    by_hand = evaluate_by_hand(local.model, eval_clients[name], own_descriptor(local.clients[name].dataset))
    local.load_trainable_state(local.global_state)
    assert record["eval_clients"][name]["accuracy"] == pytest.approx(by_hand["accuracy"])
    assert record["eval_clients"][name]["loss"] == pytest.approx(by_hand["loss"], abs=1e-6)


# ---- client sampling -----------------------------------------------------------------------------------------------


def _sampler(tmp_path, **overrides):
    clients, _ = make_clients({f"c{i}": 4 for i in range(6)})
    return build(tmp_path, clients, **overrides)


def test_client_sampling_is_deterministic_sized_and_seeded(tmp_path, monkeypatch):
    trainer = _sampler(tmp_path, clients_per_round=3)
    rounds = range(1, 21)
    samples = [trainer.sample_clients(r) for r in rounds]
    for sample in samples:
        assert len(sample) == len(set(sample)) == 3
        assert set(sample) <= set(trainer.training_clients)
    assert len({tuple(s) for s in samples}) > 1  # rounds differ
    assert set().union(*samples) == set(trainer.training_clients)  # nobody is starved over 20 rounds

    # a pure function of (sampling seed, round): global RNGs and another trainer do not change it
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert [trainer.sample_clients(r) for r in rounds] == samples
    assert [_sampler(tmp_path, clients_per_round=3).sample_clients(r) for r in rounds] == samples
    # ... nor does the number of processes (clients, not batches, are split across processes)
    monkeypatch.setattr(FederatedTrainingArguments, "world_size", property(lambda self: 4))
    monkeypatch.setattr(FederatedTrainingArguments, "process_index", property(lambda self: 3))
    assert [trainer.sample_clients(r) for r in rounds] == samples
    monkeypatch.undo()

    # the sampling reads the arguments at call time, so one trainer serves for the seed and size variants
    args = trainer.args
    args.seed = 1
    assert [trainer.sample_clients(r) for r in rounds] != samples
    args.client_sampling_seed = 0  # takes precedence over seed
    assert [trainer.sample_clients(r) for r in rounds] == samples
    args.clients_per_round, args.client_fraction = None, 0.34  # ceil(0.34 * 6) = 3
    assert all(len(trainer.sample_clients(r)) == 3 for r in rounds)
    args.client_fraction = 1.0
    assert trainer.sample_clients(5) == sorted(trainer.training_clients)


def test_trained_rounds_follow_the_sample(tmp_path):
    clients, _ = make_clients({f"c{i}": 4 for i in range(5)})
    trainer = build(tmp_path, clients, num_rounds=3, clients_per_round=2, local_max_steps=1)
    trainer.train()
    for record in trainer.history:
        assert record["sampled_clients"] == trainer.sample_clients(record["round"])
        assert sorted(record["client_train_loss"]) == record["sampled_clients"]
        assert record["num_sampled_clients"] == record["num_clients_ok"] == 2
        assert record["num_train_examples"] == 8


# ---- every PEFT method ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["c2a", "bottleneck", "lora", "ia3", "prompt"])
def test_every_peft_method_trains_only_its_trainable_tensors(tmp_path, method):
    model = prompt_model() if method == "prompt" else tiny_model(method)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    clients, _ = make_clients({"c0": 8, "c1": 8})
    trainer = build(tmp_path, clients, model=model, local_max_steps=1)
    trainer.train()

    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing was trained"
    assert changed <= trainable
    assert set(trainer.global_state) == trainable
    record = trainer.history[0]
    expected_bytes = trainable_bytes(model)
    assert record["bytes_up_per_client"] == expected_bytes == state_nbytes(trainer.global_state)
    assert record["bytes_up"] == record["bytes_down"] == 2 * expected_bytes
    assert record["num_clients_ok"] == 2


def test_prefix_tuning_fails_inside_bert_and_is_reported(tmp_path):
    # transformers 5 BERT takes no past key values, so PEFT's prefix tuning raises in every client's forward
    clients, _ = make_clients({"c0": 8, "c1": 8})
    trainer = build(tmp_path, clients, method="prefix", local_max_steps=1)
    with pytest.raises(RuntimeError, match=r"(?s)min_clients_per_round.*past key values"):
        trainer.train()


def test_c2a_sends_fewer_bytes_than_bottleneck_adapters_at_depth(tmp_path):
    # At 12 layers the shared hypernetwork is smaller than 24 per-site adapters. (In the 2-layer tiny model it is the
    # other way round: the hypernetwork's fixed size dominates.)
    config = dict(num_hidden_layers=12, hidden_size=64)
    sent = {}
    for method, peft_config in [
        ("c2a", peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=NUM_LABELS, bottleneck_dim=8, init_seed=0)),
        ("bottleneck", peft_c2a.BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=8)),
    ]:
        torch.manual_seed(0)
        model = get_peft_model(BertForSequenceClassification(tiny_bert_config(**config)), peft_config)
        clients, _ = make_clients({"c0": 4})
        trainer = build(tmp_path / method, clients, model=model, local_max_steps=1)
        trainer.train()
        sent[method] = trainer.history[0]["bytes_up_per_client"]
        assert sent[method] == trainable_bytes(model)
    assert sent["c2a"] < sent["bottleneck"]


# ---- descriptors and dropped columns -------------------------------------------------------------------------------


def test_collator_attaches_each_clients_own_descriptor_and_id(tmp_path):
    clients, _ = make_clients({"c0": 8, "c1": 8, "c2": 8}, seed=3)
    trainer = build(tmp_path, clients, model=tiny_model("c2a", num_clients=3), cls=SpyTrainer, local_max_steps=1)
    trainer.train()
    assert len(trainer.seen) == 3  # one batch (the whole client) per client, in sampled order
    for index, (name, batch) in enumerate(zip(trainer.history[0]["sampled_clients"], trainer.seen, strict=True)):
        expected = own_descriptor(clients[name])
        assert sorted(batch["labels"].tolist()) == sorted(clients[name]["labels"])  # it is this client's batch
        assert batch["label_distribution"].shape == (8, NUM_LABELS)
        torch.testing.assert_close(batch["label_distribution"], expected.expand(8, -1), rtol=0, atol=1e-7)
        torch.testing.assert_close(trainer.clients[name].descriptor, expected, rtol=0, atol=1e-7)
        assert batch["client_ids"].tolist() == [index] * 8  # index in the sorted client names


def test_non_c2a_models_get_no_descriptor(tmp_path):
    clients, _ = make_clients({"c0": 8, "c1": 8})
    trainer = build(tmp_path, clients, method="bottleneck", cls=SpyTrainer, local_max_steps=1)
    trainer.train()
    assert len(trainer.seen) == 2
    for batch in trainer.seen:
        assert "label_distribution" not in batch and "client_ids" not in batch
    assert all(client.descriptor is None for client in trainer.clients.values())


def _row_distribution(label: int) -> list[float]:
    return [0.8 if k == label else 0.1 for k in range(NUM_LABELS)]


def test_descriptor_column_survives_remove_unused_columns(tmp_path):
    clients, _ = make_clients({"c0": 8, "c1": 8})
    clients = {
        name: ds.add_column("label_distribution", [_row_distribution(label) for label in ds["labels"]])
        for name, ds in clients.items()
    }
    trainer = build(tmp_path, clients, cls=SpyTrainer, local_max_steps=1)
    assert trainer.args.remove_unused_columns is True
    trainer.train()
    assert len(trainer.seen) == 2
    for batch in trainer.seen:
        expected = torch.tensor([_row_distribution(label) for label in batch["labels"].tolist()])
        torch.testing.assert_close(batch["label_distribution"], expected)  # the rows' own values, not the client's


def test_centralized_pools_clients_and_keeps_each_examples_descriptor(tmp_path):
    sizes = {"c0": 5, "c1": 7, "c2": 6, "late": 4}
    clients, _ = make_clients(sizes, seed=5)
    # min_clients_per_round is a federated setting: the pooled baseline (one client per round) must still run
    trainer = build(
        tmp_path,
        clients,
        cls=SpyTrainer,
        federation_mode="centralized",
        unseen_clients=["late"],
        min_clients_per_round=2,
    )
    trainer.train()
    owner = {tuple(row): name for name, ds in clients.items() for row in ds["input_ids"]}
    assert len(owner) == sum(sizes.values())  # token rows identify their client
    seen_rows = []
    for batch in trainer.seen:
        for ids, distribution in zip(batch["input_ids"].tolist(), batch["label_distribution"], strict=True):
            name = owner[tuple(ids)]
            torch.testing.assert_close(distribution, own_descriptor(clients[name]), rtol=0, atol=1e-7)
            seen_rows.append(name)
    assert sorted(seen_rows) == sorted(name for name, n in sizes.items() for _ in range(n) if name != "late")
    record = trainer.history[0]
    assert record["sampled_clients"] == ["__pooled__"] and record["num_sampled_clients"] == 1
    assert record["num_train_examples"] == 18
    assert record["local_steps"] == 3  # ceil(18 / 8)
    assert trainer.client_states == {}


# ---- Trainer pitfalls ----------------------------------------------------------------------------------------------


def test_gradient_accumulation_gives_the_same_update_and_loss(tmp_path):
    clients, _ = make_clients({"solo": 8})
    results = []
    for batch_size, accumulation in [(8, 1), (4, 2)]:
        trainer = build(
            tmp_path / str(accumulation),
            clients,
            optim="sgd",
            learning_rate=0.5,
            local_max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        assert trainer.model_accepts_loss_kwargs is False
        initial = trainer.get_trainable_state()
        trainer.train()
        assert trainer.history[0]["local_steps"] == 1
        results.append((initial, trainer.global_state, trainer.history[0]["train_loss"]))
    (initial, full, full_loss), (_, accumulated, accumulated_loss) = results
    assert norm_of_difference(full, initial) > 1e-2  # a real step was taken
    assert_states_close(accumulated, full, atol=1e-5)
    assert accumulated_loss == pytest.approx(full_loss, abs=1e-6)


class OptimizerSpy(FederatedTrainer):
    def __init__(self, *args, **kwargs):
        self.optimizer_log: list[tuple[int, int]] = []
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self.optimizer_log.append((id(optimizer), len(optimizer.state)))
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_each_round(tmp_path, reset):
    clients, _ = make_clients({"c0": 8, "c1": 8})
    trainer = build(
        tmp_path, clients, cls=OptimizerSpy, num_rounds=2, local_max_steps=2, reset_optimizer_each_round=reset
    )
    trainer.train()
    log = trainer.optimizer_log
    assert len(log) == 2 * 2 * 2  # rounds x clients x steps
    first_steps, second_steps = log[0::2], log[1::2]
    assert all(size > 0 for _, size in second_steps)  # the measure sees Adam's state once it exists
    if reset:
        assert [size for _, size in first_steps] == [0, 0, 0, 0]
    else:
        assert log[0][1] == 0
        assert all(size > 0 for _, size in first_steps[1:])  # carried over to the next client and round
        assert len({optimizer_id for optimizer_id, _ in log}) == 1
    assert len(trainer.accelerator._optimizers) == 1


def test_passed_optimizer_is_allowed_without_reset(tmp_path):
    clients, _ = make_clients({"c0": 8})
    model = tiny_model("c2a")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = build(tmp_path, clients, model=model, optimizers=(optimizer, None), reset_optimizer_each_round=False)
    initial = trainer.get_trainable_state()
    trainer.train()
    assert norm_of_difference(trainer.global_state, initial) > 0


# ---- FedProx, FedAdam, FedYogi -------------------------------------------------------------------------------------

AGG_SIZES = {"c0": 8, "c1": 12, "c2": 6}


@pytest.fixture(scope="module")
def aggregation_runs(tmp_path_factory):
    """Round 1 of the same federation under different aggregations (same seed, so the same local start)."""
    clients, _ = make_clients(AGG_SIZES, seed=7)
    settings = {
        "fedavg": {},
        "fedprox_mu0": {"aggregation": "fedprox", "proximal_mu": 0.0},
        "fedprox_strong": {"aggregation": "fedprox", "proximal_mu": 10.0},
        "fedadam": {"aggregation": "fedadam"},
        "fedyogi": {"aggregation": "fedyogi"},
    }
    runs = {}
    for name, overrides in settings.items():
        trainer = build(
            tmp_path_factory.mktemp(name), clients, optim="sgd", learning_rate=0.05, local_max_steps=3, **overrides
        )
        initial = trainer.get_trainable_state()
        trainer.train()
        runs[name] = (trainer, initial)
    return runs


def test_fedprox_shrinks_the_update_and_mu_zero_is_fedavg(aggregation_runs):
    fedavg, initial = aggregation_runs["fedavg"]
    mu0, _ = aggregation_runs["fedprox_mu0"]
    strong, _ = aggregation_runs["fedprox_strong"]
    for key in fedavg.global_state:
        assert torch.equal(mu0.global_state[key], fedavg.global_state[key])
    fedavg_norm = norm_of_difference(fedavg.global_state, initial)
    strong_norm = norm_of_difference(strong.global_state, initial)
    assert 0 < strong_norm < 0.9 * fedavg_norm


@pytest.mark.parametrize("aggregation", ["fedadam", "fedyogi"])
def test_fedadam_and_fedyogi_apply_the_server_optimizer_to_the_mean_update(aggregation_runs, aggregation):
    fedavg, initial = aggregation_runs["fedavg"]
    trainer, _ = aggregation_runs[aggregation]
    mean_update = {key: fedavg.global_state[key].double() - initial[key].double() for key in initial}
    expected = FedAdamServer(1e-2, yogi=aggregation == "fedyogi").step(initial, mean_update)
    assert_states_close(trainer.global_state, expected, atol=1e-6)
    assert norm_of_difference(trainer.global_state, fedavg.global_state) > 1e-3
    assert all(bool(torch.isfinite(t).all()) for t in trainer.global_state.values())
    server_state = trainer.server_optimizer.state_dict()
    assert set(server_state) == {f"{m}/{key}" for m in "mv" for key in initial}
    assert any(float(t.abs().sum()) > 0 for key, t in server_state.items() if key.startswith("m/"))
    other = aggregation_runs["fedyogi" if aggregation == "fedadam" else "fedadam"][0]
    assert norm_of_difference(trainer.global_state, other.global_state) > 0


# ---- metrics and output files --------------------------------------------------------------------------------------


def test_history_metrics_and_output_files(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "write_history", write_history)  # with the plot
    sizes = {f"client-{i}": 8 for i in range(5)}
    clients, eval_clients = make_clients(sizes, seed=2, eval_size=6)
    global_eval = token_dataset(10, 99, [0, 1, 2])
    trainer = build(
        tmp_path,
        clients,
        eval_clients,
        num_rounds=3,
        clients_per_round=2,
        local_max_steps=1,
        learning_rate=3e-2,
        eval_dataset=global_eval,
        unseen_clients=["client-4"],
    )
    trainer.train()
    state_bytes = state_nbytes(trainer.global_state)

    history = json.loads((tmp_path / "history.json").read_text())
    assert isinstance(history, list)
    assert [record["round"] for record in history] == [1, 2, 3]
    for record in history:
        assert "client-4" not in record["sampled_clients"]
        assert record["bytes_down"] == record["bytes_up"] == 2 * state_bytes
        assert record["bytes_up_per_client"] == state_bytes
        assert sorted(record["eval_clients"]) == [f"client-{i}" for i in range(4)]
        per_client = [scores["accuracy"] for scores in record["eval_clients"].values()]
        assert record["eval_personalized_worst_accuracy"] == min(per_client)
        assert record["eval_personalized_mean_accuracy"] == pytest.approx(np.mean(per_client))
        assert list(record["eval_unseen_clients"]) == ["client-4"]
        assert record["eval_unseen_mean_accuracy"] == record["eval_unseen_clients"]["client-4"]["accuracy"]
        assert 0.0 <= record["eval_global_accuracy"] <= 1.0

    last = history[-1]
    # per-client scores recomputed by hand: global state, the client's own descriptor. The descriptor's effect on the
    # loss is small after three short rounds (C2A's up-projection gain starts at zero) but well above float noise.
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    for name in ("client-1", "client-3"):
        by_hand = evaluate_by_hand(trainer.model, eval_clients[name], own_descriptor(clients[name]))
        assert last["eval_clients"][name]["accuracy"] == pytest.approx(by_hand["accuracy"])
        assert last["eval_clients"][name]["loss"] == pytest.approx(by_hand["loss"], abs=1e-6)
        assert last["eval_clients"][name]["num_examples"] == 6
        for other in (None, one_hot):
            assert abs(evaluate_by_hand(trainer.model, eval_clients[name], other)["loss"] - by_hand["loss"]) > 1e-5
    unseen = evaluate_by_hand(trainer.model, eval_clients["client-4"], own_descriptor(clients["client-4"]))
    assert last["eval_unseen_clients"]["client-4"]["accuracy"] == pytest.approx(unseen["accuracy"])
    assert last["eval_unseen_clients"]["client-4"]["loss"] == pytest.approx(unseen["loss"], abs=1e-6)
    # the global test set is evaluated without a descriptor
    global_by_hand = evaluate_by_hand(trainer.model, global_eval)
    assert last["eval_global_accuracy"] == pytest.approx(global_by_hand["accuracy"])
    assert last["eval_global_loss"] == pytest.approx(global_by_hand["loss"], abs=1e-6)
    assert abs(evaluate_by_hand(trainer.model, global_eval, one_hot)["loss"] - global_by_hand["loss"]) > 1e-5

    with (tmp_path / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert next(iter(rows[0])) == "round"
    assert [int(row["round"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["eval_personalized_worst_accuracy"]) == pytest.approx(
        last["eval_personalized_worst_accuracy"]
    )
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = trainer.state.log_history
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert [entry["train_loss"] for entry in log] == [record["train_loss"] for record in history]


# ---- faults --------------------------------------------------------------------------------------------------------

NAN_MARKER, RAISE_MARKER = 1, 2  # second-token values no ordinary example has (tokens 1..3 only appear first)


def _marked(dataset, marker):
    ids = [[row[0], marker, *row[2:]] for row in dataset["input_ids"]]
    return dataset.remove_columns("input_ids").add_column("input_ids", ids)


class FaultyTrainer(FederatedTrainer):
    """Raises in the second local step of the client marked RAISE_MARKER; NaN loss for the one marked NAN_MARKER."""

    raise_calls = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if bool((inputs["input_ids"][:, 1] == RAISE_MARKER).any()):
            self.raise_calls += 1
            if self.raise_calls >= 2:
                raise RuntimeError("client exploded mid-training")
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and bool((inputs["input_ids"][:, 1] == NAN_MARKER).any()):
            return loss * float("nan")
        return loss


def test_failed_and_non_finite_clients_are_dropped_and_never_averaged(tmp_path, caplog):
    good, _ = make_clients({"good-0": 8, "good-1": 12})
    bad_source, _ = make_clients({"x": 8, "y": 8, "z": 8}, seed=9)
    clients = dict(good)
    clients["bad-ids"] = bad_source["x"].remove_columns("input_ids")
    clients["bad-nan"] = _marked(bad_source["y"], NAN_MARKER)
    clients["bad-raise"] = _marked(bad_source["z"], RAISE_MARKER)
    settings = dict(local_max_steps=2)
    caplog.set_level(logging.WARNING, logger="peft_c2a.federated.trainer")
    faulty = build(tmp_path / "faulty", clients, cls=FaultyTrainer, **settings)
    faulty.train()
    reference = build(tmp_path / "reference", good, **settings)
    reference.train()

    record = faulty.history[0]
    assert record["sampled_clients"] == sorted(clients)  # the bad clients train before the good ones
    assert sorted(record["failed_clients"]) == ["bad-ids", "bad-raise"]
    assert "input_ids" in record["failed_clients"]["bad-ids"]
    assert "exploded" in record["failed_clients"]["bad-raise"]
    assert list(record["rejected_clients"]) == ["bad-nan"]
    assert "non-finite" in record["rejected_clients"]["bad-nan"]
    assert record["num_clients_ok"] == 2 and record["num_train_examples"] == 20
    assert sorted(record["client_train_loss"]) == ["good-0", "good-1"]
    state_bytes = state_nbytes(faulty.global_state)
    assert record["bytes_down"] == 5 * state_bytes
    assert record["bytes_up"] == 3 * state_bytes  # failed clients send nothing; the rejected one did send
    assert all(bool(torch.isfinite(t).all()) for t in faulty.global_state.values())
    # exactly the FedAvg of the good clients: nothing of the failures leaks into the model or the average
    assert_states_close(faulty.global_state, reference.global_state, atol=1e-7)
    assert record["train_loss"] == pytest.approx(reference.history[0]["train_loss"])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'bad-ids' failed" in messages and "'bad-nan' sent a non-finite update" in messages


def test_too_few_usable_clients_stops_with_an_error(tmp_path):
    good, _ = make_clients({"good-0": 8, "good-1": 8})
    clients = dict(good, **{"bad-ids": good["good-0"].remove_columns("input_ids")})
    trainer = build(tmp_path, clients, min_clients_per_round=3, local_max_steps=1, save_every_rounds=1)
    with pytest.raises(RuntimeError, match=r"min_clients_per_round=3.*bad-ids"):
        trainer.train()
    assert trainer.history == []
    assert not list(tmp_path.glob("round-*"))


def test_one_class_client_trains_with_one_hot_descriptor_and_a_warning(tmp_path, caplog):
    clients, _ = make_clients({"mixed": 8})
    clients["mono"] = token_dataset(8, 4, [1])
    caplog.set_level(logging.WARNING, logger="peft_c2a.federated.clients")
    trainer = build(tmp_path, clients, local_max_steps=1)
    assert any("'mono'" in r.getMessage() and "single class" in r.getMessage() for r in caplog.records)
    assert not any("'mixed'" in r.getMessage() for r in caplog.records)
    assert trainer.clients["mono"].descriptor.tolist() == [0.0, 1.0, 0.0]
    trainer.train()
    record = trainer.history[0]
    assert record["num_clients_ok"] == 2 and "mono" in record["client_train_loss"]
    assert all(bool(torch.isfinite(t).all()) for t in trainer.global_state.values())


def _bad_setup(case: str):
    """Trainer kwargs, expected error and message pattern of one bad-input case."""
    good, _ = make_clients({"c0": 4, "c1": 4})
    if case == "no clients":
        return dict(clients={}), ValueError, "at least one client"
    if case == "empty client":
        return dict(clients={**good, "c2": good["c0"].select([])}), ValueError, "'c2' has no training"
    if case in ("label too large", "negative label"):
        labels = [0, 1, 3, 1] if case == "label too large" else [0, -1, 1, 1]
        bad = Dataset.from_dict({**good["c0"][:], "labels": labels})
        return dict(clients={**good, "c0": bad}), ValueError, r"'c0'.*\[0, 3\)"
    if case == "wrong descriptor width":
        wide = good["c0"].add_column("label_distribution", [[0.5, 0.5]] * 4)
        return dict(clients={**good, "c0": wide}), ValueError, "'c0'.*3 entries"
    if case == "descriptor column on a non-C2A model":
        column = good["c0"].add_column("label_distribution", [[1 / 3] * 3] * 4)
        return dict(clients={**good, "c0": column}, method="lora"), ValueError, "not a C2A model"
    if case == "eval set of an unknown client":
        return dict(clients=good, eval_clients={"ghost": good["c0"]}), ValueError, "ghost"
    if case == "empty eval set":
        return dict(clients=good, eval_clients={"c0": good["c0"].select([])}), ValueError, "'c0' has an empty eval"
    if case == "unknown unseen client":
        return dict(clients=good, unseen_clients=["ghost"]), ValueError, "ghost"
    if case == "all clients unseen":
        return dict(clients=good, unseen_clients=["c0", "c1"]), ValueError, "none is left to train"
    if case == "min_clients_per_round above the sample":
        return dict(clients=good, clients_per_round=1, min_clients_per_round=2), ValueError, "min_clients_per_round=2"
    if case == "too few C2A client ids":
        return dict(clients=good, model=tiny_model("c2a", num_clients=1)), ValueError, "num_clients"
    raise AssertionError(case)


BAD_CASES = [
    "no clients",
    "empty client",
    "label too large",
    "negative label",
    "wrong descriptor width",
    "descriptor column on a non-C2A model",
    "eval set of an unknown client",
    "empty eval set",
    "unknown unseen client",
    "all clients unseen",
    "min_clients_per_round above the sample",
    "too few C2A client ids",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_before_training(tmp_path, case):
    setup, error, pattern = _bad_setup(case)
    clients, eval_clients = setup.pop("clients"), setup.pop("eval_clients", None)
    with pytest.raises(error, match=pattern):
        build(tmp_path, clients, eval_clients, **setup).train()


def test_wrong_argument_types_and_passed_optimizer_with_reset(tmp_path):
    clients, _ = make_clients({"c0": 4})
    model = tiny_model("c2a")
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="FederatedTrainingArguments"):
        FederatedTrainer(model, plain, clients)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="reset_optimizer_each_round"):
        build(tmp_path, clients, model=model, optimizers=(optimizer, None))
    trainer = build(tmp_path, clients, model=model)
    with pytest.raises(TypeError, match="Unexpected"):
        trainer.train(model_path="x")


# ---- the prior-only guess ------------------------------------------------------------------------------------------


def test_prior_only_accuracy_is_the_majority_training_label_guess():
    from peft_c2a.federated import prior_only_accuracy

    assert prior_only_accuracy(np.array([1, 5, 2]), np.array([1, 1, 0, 2, -100])) == pytest.approx(0.5)
    assert prior_only_accuracy(np.array([3, 3, 0]), np.array([0, 1])) == pytest.approx(0.5)  # tie: smallest id
    assert math.isnan(prior_only_accuracy(np.array([1, 0]), np.array([-100])))


@pytest.mark.parametrize("method", ["c2a", "lora"])
def test_every_evaluation_reports_the_prior_only_guess(tmp_path, method):
    clients, eval_clients = skewed_clients()
    trainer = build(tmp_path, clients, eval_clients, method=method, unseen_clients=["client-3"])
    trainer.train()
    record = trainer.history[-1]
    expected = {}
    for name, dataset in eval_clients.items():
        majority = np.bincount(np.asarray(clients[name]["labels"]), minlength=NUM_LABELS).argmax()
        expected[name] = float(np.mean(np.asarray(dataset["labels"]) == majority))
    for name in ("client-0", "client-1", "client-2"):
        assert record["eval_clients"][name]["prior_only_accuracy"] == pytest.approx(expected[name])
    assert record["eval_unseen_clients"]["client-3"]["prior_only_accuracy"] == pytest.approx(expected["client-3"])
    mean = np.mean([expected[name] for name in ("client-0", "client-1", "client-2")])
    assert record["eval_personalized_mean_prior_only_accuracy"] == pytest.approx(mean)
    assert record["eval_unseen_mean_prior_only_accuracy"] == pytest.approx(expected["client-3"])
