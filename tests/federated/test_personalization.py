"""Protocol v2's federated options: a learning rate that decays across rounds, FedAvg-FT (fine-tune on the client's
own data before its personalised evaluation) and the post-hoc client-prior logit adjustment."""

from __future__ import annotations

import math

import pytest

from peft_c2a.federated.local_training import unwrap_optimizer
from peft_c2a.federated.metrics import prior_logit_offsets

from ..federated_utils import fed_args
from .test_federated_trainer import assert_states_close, build, make_clients


def test_round_lr_factor():
    assert [fed_args(".", num_rounds=4).round_lr_factor(t) for t in (1, 4)] == [1.0, 1.0]
    linear = fed_args(".", num_rounds=4, round_lr_scheduler="linear")
    assert [linear.round_lr_factor(t) for t in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = fed_args(".", num_rounds=4, round_lr_scheduler="cosine")
    factors = [cosine.round_lr_factor(t) for t in (1, 2, 3, 4)]
    assert factors[0] == 1.0 and factors[2] == pytest.approx(0.5) and factors == sorted(factors, reverse=True)
    assert factors[3] == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))


@pytest.mark.parametrize(("scheduler", "expected"), [("constant", 1.0), ("linear", 1 / 3)])
def test_the_last_round_trains_at_the_decayed_rate(tmp_path, scheduler, expected):
    clients, _ = make_clients({"a": 8, "b": 8})
    trainer = build(tmp_path, clients, num_rounds=3, local_max_steps=1, round_lr_scheduler=scheduler)
    trainer.train()
    group = unwrap_optimizer(trainer.optimizer).param_groups[0]
    assert group["initial_lr"] == pytest.approx(trainer.args.learning_rate * expected)


def test_personalization_steps_fine_tune_before_evaluating_and_restore_the_state(tmp_path):
    clients, evals = make_clients({"a": 12, "b": 12, "new": 8}, eval_size=6)
    plain = build(tmp_path / "plain", clients, evals, num_rounds=1, unseen_clients=["new"], eval_dataset=evals["a"])
    plain.train()
    tuned = build(
        tmp_path / "tuned",
        clients,
        evals,
        num_rounds=1,
        unseen_clients=["new"],
        eval_dataset=evals["a"],
        personalization_steps=3,
        learning_rate=5e-2,
    )
    tuned.train()
    before = tuned.get_trainable_state()
    first, second = tuned.evaluate_federation(), tuned.evaluate_federation()
    assert_states_close(tuned.get_trainable_state(), before, atol=0)  # every client's fine-tuning was undone
    assert first["eval_clients"] == second["eval_clients"]  # seeded: the same fine-tuning each time
    # the global model is scored as it is; the clients after their own fine-tuning
    assert first["eval_global_loss"] == pytest.approx(tuned.history[-1]["eval_global_loss"])
    assert tuned.history[-1]["eval_clients"] != plain.history[-1]["eval_clients"]
    assert first["eval_unseen_clients"]["new"]["loss"] != pytest.approx(
        plain.history[-1]["eval_unseen_clients"]["new"]["loss"]
    )


def test_eval_logit_adjustment_by_a_strong_prior_predicts_each_clients_majority_label(tmp_path):
    clients, evals = make_clients({"a": 13, "b": 11}, eval_size=6)  # odd sizes over two labels: no tied prior
    trainer = build(tmp_path, clients, evals, num_rounds=1, eval_logit_adjustment=100.0, eval_dataset=evals["a"])
    trainer.train()
    record = trainer.history[-1]
    checked = 0
    for name, scores in record["eval_clients"].items():
        counts = sorted(trainer.clients[name].label_counts, reverse=True)
        if counts[0] > counts[1]:  # a tie in the prior leaves the choice to the model
            assert scores["accuracy"] == pytest.approx(scores["prior_only_accuracy"]), name
            checked += 1
    assert checked
    plain = build(tmp_path / "plain", clients, evals, num_rounds=1, eval_dataset=evals["a"])
    plain.train()
    assert record["eval_global_accuracy"] == plain.history[-1]["eval_global_accuracy"]  # no client prior there
    assert record["eval_personalized_mean_loss"] == pytest.approx(plain.history[-1]["eval_personalized_mean_loss"])


def test_prior_logit_offsets_are_centred_and_scaled():
    offsets = prior_logit_offsets([8, 2, 0], tau=2.0)
    assert offsets.sum() == pytest.approx(0.0) and offsets[0] > offsets[1] > offsets[2]
    assert offsets[0] - offsets[1] == pytest.approx(2.0 * (math.log(0.81) - math.log(0.21)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"round_lr_scheduler": "step"}, "round_lr_scheduler"),
        ({"personalization_steps": -1}, "personalization_steps"),
        ({"personalization_steps": 2, "reset_optimizer_each_round": False}, "fresh optimizer"),
        ({"eval_logit_adjustment": -1.0}, "eval_logit_adjustment"),
        ({"eval_logit_adjustment": float("nan")}, "eval_logit_adjustment"),
    ],
)
def test_bad_values_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fed_args(tmp_path, **overrides)


def test_the_global_evaluation_counts_the_classes_it_predicts(tmp_path):
    clients, evals = make_clients({"a": 10, "b": 10}, eval_size=8)
    trainer = build(tmp_path, clients, evals, num_rounds=2, eval_dataset=evals["a"])
    trainer.train()
    for record in trainer.history:
        assert 1 <= record["eval_global_predicted_classes"] <= 3
        assert all("predicted_classes" not in scores for scores in record["eval_clients"].values())
