"""Pure tests of the federation's server maths, metrics and arguments (no model, no Trainer run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import HfArgumentParser

from peft_c2a.federated import (
    FedAdamServer,
    FedAvgServer,
    FederatedTrainingArguments,
    UpdateAccumulator,
    classification_metrics,
    make_server_optimizer,
    state_nbytes,
    summarize_clients,
)
from peft_c2a.federated.aggregation import non_finite_tensors


def _template() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 3, dtype=torch.float32), "b": torch.zeros(4, dtype=torch.float16)}


def _random_update(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(2, 3, generator=generator, dtype=torch.float32),
        "b": torch.randn(4, generator=generator, dtype=torch.float32).to(torch.float16),
    }


# ---- UpdateAccumulator ---------------------------------------------------------------------------------------------


def test_accumulator_weighted_mean_matches_hand_computation():
    updates = [_random_update(seed) for seed in range(3)]
    weights = [5, 1, 14]
    originals = [{k: v.clone() for k, v in update.items()} for update in updates]
    accumulator = UpdateAccumulator(_template())
    for update, weight in zip(updates, weights, strict=True):
        accumulator.add(update, weight)
    mean = accumulator.mean()

    assert accumulator.total_weight == 20.0
    for name, template in _template().items():
        expected = sum(w * u[name].double() for u, w in zip(updates, weights, strict=True)) / sum(weights)
        assert mean[name].dtype == template.dtype
        assert mean[name].shape == template.shape
        torch.testing.assert_close(mean[name], expected.to(template.dtype), rtol=0, atol=0)
    # the inputs are left untouched
    for update, original in zip(updates, originals, strict=True):
        for name in update:
            assert torch.equal(update[name], original[name])


def test_accumulator_equal_weights_is_plain_mean_and_single_update_is_identity():
    a, b = _random_update(0), _random_update(1)
    accumulator = UpdateAccumulator(_template())
    accumulator.add(a, 3)
    only_a = accumulator.mean()
    torch.testing.assert_close(only_a["w"], a["w"], rtol=0, atol=0)
    accumulator.add(b, 3)
    torch.testing.assert_close(accumulator.mean()["w"], (a["w"].double() + b["w"].double()).div(2).float())


def test_accumulator_rejects_mismatched_names_and_empty_mean():
    accumulator = UpdateAccumulator(_template())
    with pytest.raises(ValueError, match="No client update"):
        accumulator.mean()
    update = _random_update(0)
    with pytest.raises(ValueError, match="do not match"):
        accumulator.add({"w": update["w"]}, 1)
    with pytest.raises(ValueError, match="do not match"):
        accumulator.add(update | {"extra": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="do not match"):
        accumulator.add({"w": update["w"], "c": update["b"]}, 1)
    assert accumulator.total_weight == 0.0


# ---- server optimizers ---------------------------------------------------------------------------------------------


def _global_and_delta(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    global_state = {"a": torch.randn(3, 2, generator=generator), "b": torch.randn(5, generator=generator)}
    delta = {name: 0.1 * torch.randn(t.shape, generator=generator) for name, t in global_state.items()}
    return global_state, delta


@pytest.mark.parametrize("learning_rate", [1.0, 0.5])
def test_fedavg_server_moves_global_by_lr_times_mean(learning_rate):
    global_state, delta = _global_and_delta()
    before = {k: v.clone() for k, v in global_state.items()}
    new = FedAvgServer(learning_rate).step(global_state, delta)
    for name in global_state:
        torch.testing.assert_close(new[name], before[name] + learning_rate * delta[name])
        assert new[name].dtype == before[name].dtype
        assert torch.equal(global_state[name], before[name])  # inputs untouched
    server = FedAvgServer()
    assert server.state_dict() == {}
    server.load_state_dict({})
    with pytest.raises(ValueError, match="no server state"):
        server.load_state_dict({"m/a": torch.zeros(1)})


def _reference_adaptive(x, deltas, lr, b1, b2, tau, yogi):
    """Reddi et al. (2021), Algorithm 2, written out in float64 numpy."""
    x = x.astype(np.float64).copy()
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if yogi:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("yogi", [False, True])
def test_fedadam_and_fedyogi_match_reference_over_two_steps(yogi):
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    global_state, delta1 = _global_and_delta(0)
    _, delta2 = _global_and_delta(1)
    global_state = {k: v.double() for k, v in global_state.items()}
    server = FedAdamServer(lr, beta1=b1, beta2=b2, tau=tau, yogi=yogi)
    after_one = server.step(global_state, delta1)
    after_two = server.step(after_one, delta2)
    for name, x0 in global_state.items():
        d1, d2 = delta1[name].double().numpy(), delta2[name].double().numpy()
        ref1 = _reference_adaptive(x0.numpy(), [d1], lr, b1, b2, tau, yogi)
        ref2 = _reference_adaptive(x0.numpy(), [d1, d2], lr, b1, b2, tau, yogi)
        np.testing.assert_allclose(after_one[name].numpy(), ref1, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(after_two[name].numpy(), ref2, rtol=1e-12, atol=1e-14)
    assert set(server.state_dict()) == {"m/a", "m/b", "v/a", "v/b"}


def test_fedyogi_differs_from_fedadam_and_float32_state_keeps_dtype():
    global_state, delta = _global_and_delta()
    adam = FedAdamServer(0.1, yogi=False).step(global_state, delta)
    yogi = FedAdamServer(0.1, yogi=True).step(global_state, delta)
    assert adam["a"].dtype == torch.float32
    assert not torch.allclose(adam["a"], yogi["a"])
    for name, x0 in global_state.items():
        ref = _reference_adaptive(x0.double().numpy(), [delta[name].double().numpy()], 0.1, 0.9, 0.99, 1e-3, False)
        np.testing.assert_allclose(adam[name].numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("yogi", [False, True])
def test_fedadam_state_dict_round_trip_continues_identically(yogi):
    global_state, delta1 = _global_and_delta(0)
    _, delta2 = _global_and_delta(1)
    first = FedAdamServer(0.05, yogi=yogi)
    state = first.step(global_state, delta1)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    second = FedAdamServer(0.05, yogi=yogi)
    second.load_state_dict(saved)
    continued, resumed = first.step(state, delta2), second.step(state, delta2)
    for name in continued:
        assert torch.equal(continued[name], resumed[name])
    # without the restored moments the step is different (the state matters)
    fresh = FedAdamServer(0.05, yogi=yogi).step(state, delta2)
    assert not torch.allclose(fresh["a"], continued["a"])
    with pytest.raises(ValueError, match="other than"):
        FedAdamServer(0.05).load_state_dict(saved | {"x/a": torch.zeros(1)})


# ---- small helpers -------------------------------------------------------------------------------------------------


def test_non_finite_tensors_names_bad_tensors_in_order():
    update = {
        "ok": torch.randn(3),
        "nan": torch.tensor([0.0, float("nan")]),
        "ints": torch.arange(3),
        "inf": torch.tensor([float("inf")]),
        "neg_inf": torch.tensor([[1.0, -float("inf")]], dtype=torch.float16),
    }
    assert non_finite_tensors(update) == ["nan", "inf", "neg_inf"]
    assert non_finite_tensors({"a": torch.zeros(2, 2)}) == []


def test_state_nbytes_is_exact():
    state = {
        "f32": torch.zeros(3, 4, dtype=torch.float32),
        "f16": torch.zeros(5, dtype=torch.float16),
        "bf16": torch.zeros(2, 2, dtype=torch.bfloat16),
        "f64": torch.zeros(1, dtype=torch.float64),
    }
    assert state_nbytes(state) == 3 * 4 * 4 + 5 * 2 + 4 * 2 + 8
    assert state_nbytes({}) == 0


# ---- classification metrics ----------------------------------------------------------------------------------------


def test_classification_metrics_known_values():
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])
    # F1 per class = 2 TP / (predicted + true): class 0: 2/4, class 1: 4/5, class 2 (never predicted): 0
    assert classification_metrics(predictions, labels) == pytest.approx(
        {"accuracy": 3 / 5, "macro_f1": (0.5 + 0.8 + 0.0) / 3, "num_examples": 5}
    )
    # a class neither true nor predicted does not count (no division by the number of possible classes)
    assert classification_metrics(np.array([3, 3, 1]), np.array([3, 3, 1]))["macro_f1"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 4), st.one_of(st.integers(0, 4), st.just(-100))), min_size=1, max_size=40)
)
def test_classification_metrics_ignore_positions_labelled_minus_100(pairs):
    predictions = np.array([p for p, _ in pairs])
    labels = np.array([label for _, label in pairs])
    keep = labels != -100
    got = classification_metrics(predictions, labels)
    assert got["num_examples"] == int(keep.sum())
    if not keep.any():
        assert math.isnan(got["accuracy"]) and math.isnan(got["macro_f1"])
        return
    # the ignored positions' predictions play no part: the scores are those of the labelled positions alone
    assert got == classification_metrics(predictions[keep], labels[keep])
    assert got["accuracy"] == pytest.approx(np.mean(predictions[keep] == labels[keep]), abs=1e-12)
    assert 0.0 <= got["macro_f1"] <= 1.0
    # renaming the classes changes nothing
    renamed = classification_metrics((predictions + 7) * 3, np.where(keep, (labels + 7) * 3, -100))
    assert renamed == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics_flatten_2d_input(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=(4, 15))
    labels[rng.random(labels.shape) < 0.2] = -100
    predictions = rng.integers(0, 3, size=(4, 15))  # classes 3..5 never predicted: each scores F1 = 0
    assert classification_metrics(predictions, labels) == classification_metrics(
        predictions.reshape(-1), labels.reshape(-1)
    )


def test_classification_metrics_edge_cases():
    # a predicted class with no true example counts (the union of true and predicted labels)
    assert classification_metrics(np.array([0, 0, 2]), np.array([0, 0, 0])) == pytest.approx(
        {"accuracy": 2 / 3, "macro_f1": (0.8 + 0.0) / 2, "num_examples": 3}
    )
    assert classification_metrics(np.array([1, 2, 0]), np.array([1, 2, 0])) == {
        "accuracy": 1.0,
        "macro_f1": 1.0,
        "num_examples": 3,
    }
    all_ignored = classification_metrics(np.array([1, 2]), np.array([-100, -100]))
    assert all_ignored["num_examples"] == 0 and math.isnan(all_ignored["accuracy"])
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.zeros(3), np.zeros(4))
    scores = classification_metrics(np.array([1, 1]), np.array([1, 0]))
    assert all(type(value) is float for key, value in scores.items() if key != "num_examples")
    assert type(scores["num_examples"]) is int


# ---- per-client summaries ------------------------------------------------------------------------------------------


def test_summarize_clients_by_hand():
    per_client = {
        "a": {"accuracy": 0.5, "loss": 1.0, "num_examples": 10},
        "b": {"accuracy": 1.0, "loss": 0.2, "num_examples": 30},
        "c": {"accuracy": 0.25, "loss": 2.0, "num_examples": 20},
    }
    summary = summarize_clients(per_client, "eval_personalized")
    accuracies, losses, weights = np.array([0.5, 1.0, 0.25]), np.array([1.0, 0.2, 2.0]), np.array([10, 30, 20])
    assert summary["eval_personalized_num_clients"] == 3
    assert summary["eval_personalized_mean_accuracy"] == pytest.approx(1.75 / 3)
    assert summary["eval_personalized_weighted_accuracy"] == pytest.approx((5 + 30 + 5) / 60)
    assert summary["eval_personalized_worst_accuracy"] == 0.25
    assert summary["eval_personalized_std_accuracy"] == pytest.approx(
        math.sqrt(((accuracies - accuracies.mean()) ** 2).mean())
    )
    assert summary["eval_personalized_mean_loss"] == pytest.approx(3.2 / 3)
    assert summary["eval_personalized_weighted_loss"] == pytest.approx((losses * weights).sum() / 60)
    assert summary["eval_personalized_max_loss"] == 2.0  # worst loss is the largest
    assert "eval_personalized_worst_loss" not in summary
    assert not any(key.endswith("_num_examples") for key in summary if key != "eval_personalized_num_clients")
    assert summarize_clients({}, "x") == {}


def test_summarize_clients_skips_non_finite_scores():
    per_client = {
        "a": {"accuracy": 0.5, "num_examples": 10},
        "empty": {"accuracy": float("nan"), "num_examples": 0},
        "b": {"accuracy": 1.0, "num_examples": 30},
    }
    summary = summarize_clients(per_client, "p")
    assert summary["p_num_clients"] == 3
    assert summary["p_mean_accuracy"] == pytest.approx(0.75)
    assert summary["p_worst_accuracy"] == 0.5
    assert summary["p_weighted_accuracy"] == pytest.approx(35 / 40)


# ---- FederatedTrainingArguments ------------------------------------------------------------------------------------


def _args(tmp_path, **overrides) -> FederatedTrainingArguments:
    return FederatedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"federation_mode": "split"}, "federation_mode"),
        ({"num_rounds": 0}, "num_rounds"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"client_fraction": 0.0}, "client_fraction"),
        ({"client_fraction": 1.5}, "client_fraction"),
        ({"local_epochs": 0.0}, "local_epochs"),
        ({"min_clients_per_round": 0}, "min_clients_per_round"),
        ({"eval_every_rounds": -1}, "eval_every_rounds"),
        ({"save_every_rounds": -2}, "save_every_rounds"),
        ({"aggregation": "fedprox", "proximal_mu": -0.1}, "proximal_mu"),
        ({"server_learning_rate": 0.0}, "server_learning_rate"),
        ({"server_beta1": 1.0}, "server_beta1"),
        ({"server_beta2": -0.1}, "server_beta2"),
        ({"server_tau": 0.0}, "server_tau"),
    ],
)
def test_arguments_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_arguments_defaults_and_sampling_counts(tmp_path):
    args = _args(tmp_path, aggregation="FedAvg", local_epochs=0.0, local_max_steps=3)  # max steps makes epochs moot
    assert args.aggregation == "fedavg" and args.federation_mode == "federated"
    assert args.num_sampled_clients(10) == 10
    assert _args(tmp_path, clients_per_round=3).num_sampled_clients(10) == 3
    assert _args(tmp_path, clients_per_round=30).num_sampled_clients(10) == 10
    assert _args(tmp_path, clients_per_round=2, client_fraction=0.9).num_sampled_clients(10) == 2
    assert _args(tmp_path, client_fraction=0.25).num_sampled_clients(10) == 3  # rounded up
    assert _args(tmp_path, client_fraction=0.01).num_sampled_clients(10) == 1  # at least one
    assert args.effective_client_sampling_seed == args.seed
    assert _args(tmp_path, seed=3, client_sampling_seed=11).effective_client_sampling_seed == 11


@pytest.mark.parametrize(
    "aggregation, lr, server_type, yogi",
    [
        ("fedavg", 1.0, FedAvgServer, None),
        ("fedprox", 1.0, FedAvgServer, None),
        ("fedadam", 1e-2, FedAdamServer, False),
        ("fedyogi", 1e-2, FedAdamServer, True),
    ],
)
def test_default_server_learning_rate_and_server_type(tmp_path, aggregation, lr, server_type, yogi):
    args = _args(tmp_path, aggregation=aggregation)
    assert args.effective_server_learning_rate == lr
    server = make_server_optimizer(args)
    assert type(server) is server_type and server.learning_rate == lr
    if yogi is not None:
        assert server.yogi is yogi
        assert (server.beta1, server.beta2, server.tau) == (0.9, 0.99, 1e-3)
    assert _args(tmp_path, aggregation=aggregation, server_learning_rate=0.3).effective_server_learning_rate == 0.3


def test_arguments_parse_from_command_line(tmp_path):
    parser = HfArgumentParser(FederatedTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--aggregation",
            "fedprox",
            "--proximal_mu",
            "0.1",
            "--clients_per_round",
            "3",
            "--num_rounds",
            "7",
            "--local_max_steps",
            "5",
            "--reset_optimizer_each_round",
            "false",
            "--federation_mode",
            "local",
            "--server_learning_rate",
            "0.7",
            "--learning_rate",
            "0.002",
        ]
    )
    assert isinstance(args, FederatedTrainingArguments)
    assert args.aggregation == "fedprox" and args.proximal_mu == 0.1
    assert args.clients_per_round == 3 and args.num_rounds == 7 and args.local_max_steps == 5
    assert args.reset_optimizer_each_round is False and args.federation_mode == "local"
    assert args.effective_server_learning_rate == 0.7 and args.learning_rate == 0.002
    assert args.num_sampled_clients(10) == 3
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert defaults.aggregation == "fedavg" and defaults.clients_per_round is None and defaults.num_rounds == 10
    assert defaults.reset_optimizer_each_round is True and defaults.client_sampling_seed is None
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--aggregation", "median"])


def test_loggable_items_keep_the_headline_and_leave_spreads_of_other_scores_to_the_history():
    from peft_c2a.federated.metrics import loggable_items

    record = {
        "round": 3,
        "train_loss": 0.5,
        "train_time": 1.0,
        "eval_personalized_mean_accuracy": 0.9,
        "eval_personalized_std_accuracy": 0.1,
        "eval_personalized_weighted_accuracy": 0.91,
        "eval_personalized_mean_loss": 0.3,
        "eval_personalized_weighted_loss": 0.31,
        "eval_personalized_max_loss": 0.9,
        "eval_personalized_mean_metric_macro_f1": 0.8,
        "eval_personalized_worst_metric_macro_f1": 0.5,
        "eval_personalized_weighted_metric_macro_f1": 0.81,
        "eval_personalized_std_metric_macro_f1": 0.05,
        "eval_global_num_examples": 40,
        "eval_clients": {"a": {"accuracy": 1.0}},
    }
    assert sorted(loggable_items(record)) == [
        "eval_personalized_mean_accuracy",
        "eval_personalized_mean_loss",
        "eval_personalized_mean_metric_macro_f1",
        "eval_personalized_std_accuracy",
        "eval_personalized_weighted_accuracy",
        "eval_personalized_worst_metric_macro_f1",
        "round",
        "train_loss",
    ]
