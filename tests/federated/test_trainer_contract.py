"""`FederatedTrainer` keeps the `Trainer` contract across rounds: callbacks fire per round, `evaluate()` returns the
federation's scores, `metric_for_best_model` / `load_best_model_at_end` / `EarlyStoppingCallback` work on rounds,
activation checkpointing is honoured, and loop fields a federation ignores are reported or refused."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainerCallback, default_data_collator

from peft_c2a.federated import FederatedTrainer, FederatedTrainingArguments
from peft_c2a.federated.best_round import best_evaluation
from peft_c2a.federated.callback_states import export_callback_states, restore_callback_states
from peft_c2a.federated.checkpoint import TRAINABLE_STATE_FILE, list_checkpoints

from ..federated_utils import fed_args, tiny_model
from .test_federated_trainer import assert_states_close, build, evaluate_by_hand, make_clients, own_descriptor


class Recorder(TrainerCallback):
    """Every event the trainer fires, with the round it fired in."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.evaluations: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append(("step_begin", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step))
        self.evaluations.append(metrics)

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step))


def test_callbacks_fire_per_round_like_the_trainers_steps(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(tmp_path, clients, evals, num_rounds=3, eval_every_rounds=2, save_every_rounds=2)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    # round 2 and the last round are evaluated and checkpointed; a step begins at the round before
    # in the Trainer's order: step end, log, evaluate, save
    assert recorder.events == [
        ("step_begin", 0),
        ("step_end", 1),
        ("log", 1),
        ("step_begin", 1),
        ("step_end", 2),
        ("log", 2),
        ("evaluate", 2),
        ("save", 2),
        ("step_begin", 2),
        ("step_end", 3),
        ("log", 3),
        ("evaluate", 3),
        ("save", 3),
    ]
    # on_evaluate gets the round's scalar evaluation scores, as recorded in the history
    for metrics, record in zip(recorder.evaluations, trainer.history[1:], strict=True):
        assert metrics == {k: v for k, v in record.items() if k.startswith("eval_") and isinstance(v, (int, float))}

    metrics = trainer.evaluate()
    assert recorder.evaluations[-1] == metrics and recorder.events[-1] == ("evaluate", 3)
    assert metrics["eval_personalized_mean_accuracy"] == pytest.approx(
        trainer.history[-1]["eval_personalized_mean_accuracy"]
    )
    renamed = trainer.evaluate(metric_key_prefix="test")
    assert renamed["test_personalized_mean_accuracy"] == metrics["eval_personalized_mean_accuracy"]


def test_eval_delay_counts_rounds_and_the_last_round_is_always_evaluated(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(tmp_path, clients, evals, num_rounds=5, eval_every_rounds=1, eval_delay=4, save_every_rounds=0)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    # the Trainer's rule with rounds for steps: evaluate once `eval_delay <= round`
    assert [step for event, step in recorder.events if event == "evaluate"] == [4, 5]
    evaluated = [r["round"] for r in trainer.history if "eval_personalized_mean_accuracy" in r]
    assert evaluated == [4, 5]
    late = build(
        tmp_path / "late", clients, evals, num_rounds=2, eval_every_rounds=1, eval_delay=9, save_every_rounds=0
    )
    late.train()
    assert [r["round"] for r in late.history if "eval_personalized_mean_accuracy" in r] == [2]


@pytest.mark.parametrize("delay", [1.5, -1.0, float("nan")])
def test_eval_delay_must_be_a_whole_number_of_rounds(tmp_path, delay):
    with pytest.raises(ValueError, match="eval_delay"):
        fed_args(tmp_path, eval_delay=delay)


def marked_round_metric(trainer_holder, best_round):
    """`compute_metrics` scoring 1.0 in the evaluation of `best_round` and 0.0 in every other: a known best round."""

    def compute_metrics(prediction):
        return {"marker": 1.0 if trainer_holder[0].state.global_step == best_round - 1 else 0.0}

    return compute_metrics


def test_load_best_model_at_end_restores_the_best_round_and_keeps_its_checkpoint(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    holder = []
    args = fed_args(
        tmp_path,
        num_rounds=4,
        save_every_rounds=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="personalized_mean_marker",
    )
    assert args.greater_is_better is True
    trainer = FederatedTrainer(
        tiny_model(),
        args,
        clients,
        evals,
        data_collator=default_data_collator,
        compute_metrics=marked_round_metric(holder, best_round=2),
    )
    holder.append(trainer)
    trainer.train()

    assert trainer.state.best_global_step == 2 and trainer.state.best_metric == 1.0
    assert trainer.state.best_model_checkpoint == str(tmp_path / "round-2")
    # pruning to one checkpoint kept the best one besides the newest
    assert [index for index, _ in list_checkpoints(tmp_path)] == [2, 4]
    best_state = load_file(tmp_path / "round-2" / TRAINABLE_STATE_FILE)
    last_state = load_file(tmp_path / "round-4" / TRAINABLE_STATE_FILE)
    assert_states_close(trainer.global_state, best_state, atol=0)
    assert_states_close(trainer.get_trainable_state(), {**trainer.get_trainable_state(), **best_state}, atol=0)
    assert any(not torch.equal(best_state[key], last_state[key]) for key in best_state)
    # the model scores what round 2 scored
    again = trainer.evaluate()
    assert again["eval_personalized_mean_loss"] == pytest.approx(trainer.history[1]["eval_personalized_mean_loss"])

    # a resumed run finds the same best round in the history
    holder.clear()
    resumed = FederatedTrainer(
        tiny_model(),
        fed_args(
            tmp_path,
            num_rounds=5,
            save_every_rounds=1,
            save_total_limit=1,
            load_best_model_at_end=True,
            metric_for_best_model="personalized_mean_marker",
        ),
        clients,
        evals,
        data_collator=default_data_collator,
        compute_metrics=marked_round_metric(holder, best_round=2),
    )
    holder.append(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.best_global_step == 2 and [i for i, _ in list_checkpoints(tmp_path)] == [2, 5]


def test_early_stopping_callback_stops_the_federation_and_checkpoints_the_last_round(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(
        tmp_path,
        clients,
        evals,
        num_rounds=6,
        save_every_rounds=3,
        metric_for_best_model="personalized_mean_loss",
        load_best_model_at_end=True,
    )
    # a threshold no change can pass: round 2 does not count as an improvement, and patience 1 stops there
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=1e9))
    output = trainer.train()
    assert output.global_step == 2 and [record["round"] for record in trainer.history] == [1, 2]
    # the stopping round is checkpointed (resumable) although 2 is not a multiple of save_every_rounds
    assert [index for index, _ in list_checkpoints(tmp_path)] == [2]


@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_patience_survives_a_resume_when_callback_states_are_restored(tmp_path, restore):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    options = dict(
        num_rounds=6,
        save_every_rounds=3,
        metric_for_best_model="personalized_mean_loss",
        load_best_model_at_end=True,
        restore_callback_states_from_checkpoint=restore,
    )
    # no round counts as an improvement (threshold), so the counter is the number of evaluations after the first
    uninterrupted = build(tmp_path / "whole", clients, evals, **options)
    uninterrupted.add_callback(EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9))
    assert uninterrupted.train().global_step == 3

    # the same run, stopped after round 2 by patience 1 (counter 1), resumed with patience 2
    first = build(tmp_path / "split", clients, evals, **options)
    first.add_callback(EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=1e9))
    assert first.train().global_step == 2
    meta = first.server.read_checkpoint(list_checkpoints(tmp_path / "split")[-1][1]).meta
    assert meta["callback_states"]["EarlyStoppingCallback"][0]["attributes"] == {"early_stopping_patience_counter": 1}
    resumed = build(tmp_path / "split", clients, evals, **options)
    stopper = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9)
    resumed.add_callback(stopper)
    output = resumed.train(resume_from_checkpoint=True)
    # restored: the counter goes on from 1 and the resumed run stops where the uninterrupted one did; not restored
    # (the Trainer's default too): it counts afresh and runs one round longer
    assert output.global_step == (3 if restore else 4) and stopper.early_stopping_patience == 2
    assert [record["round"] for record in resumed.history] == list(range(1, output.global_step + 1))


def test_callback_states_go_to_callbacks_of_their_class_in_order_and_the_rest_is_reported(caplog):
    first, second = EarlyStoppingCallback(3), EarlyStoppingCallback(4)
    first.early_stopping_patience_counter, second.early_stopping_patience_counter = 1, 2
    stored = export_callback_states([Recorder(), first, second])
    assert list(stored) == ["EarlyStoppingCallback"]  # only ExportableState callbacks have a state
    fresh = [EarlyStoppingCallback(5), Recorder(), EarlyStoppingCallback(6)]
    restore_callback_states(fresh, stored)
    # the k-th stored state goes to the k-th callback of its class; the callbacks' own arguments are kept
    assert [(cb.early_stopping_patience_counter, cb.early_stopping_patience) for cb in fresh[::2]] == [(1, 5), (2, 6)]
    one = [EarlyStoppingCallback(5)]
    with caplog.at_level(logging.WARNING, logger="peft_c2a.federated.callback_states"):
        restore_callback_states(one, {**stored, "MissingCallback": [{"attributes": {"x": 1}}]})
    assert one[0].early_stopping_patience_counter == 1
    assert "EarlyStoppingCallback (1 of 2)" in caplog.text and "MissingCallback (1 of 1)" in caplog.text


def test_a_callback_state_json_cannot_hold_is_left_out_of_the_checkpoint_and_keeps_its_place(caplog):
    class TensorCounter(EarlyStoppingCallback):
        """Holds its counter as a tensor (JSON cannot) when `as_tensor`, else as an int."""

        def __init__(self, counter, as_tensor):
            super().__init__(early_stopping_patience=3)
            self.early_stopping_patience_counter, self.as_tensor = counter, as_tensor

        def state(self):
            state = super().state()
            if self.as_tensor:
                state["attributes"]["early_stopping_patience_counter"] = torch.tensor(1)
            return state

    with caplog.at_level(logging.WARNING, logger="peft_c2a.federated.callback_states"):
        stored = export_callback_states([TensorCounter(1, True), TensorCounter(2, False)])
    assert "Not checkpointing the state of TensorCounter" in caplog.text
    json.dumps(stored)
    # a placeholder keeps the positions: the second callback gets its own state back, not the first one's slot
    fresh = [TensorCounter(0, False), TensorCounter(0, False)]
    restore_callback_states(fresh, stored)
    assert [cb.early_stopping_patience_counter for cb in fresh] == [0, 2]


def test_a_missing_metric_for_best_model_names_the_available_ones(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(tmp_path, clients, evals, metric_for_best_model="personalized_mean_bleu")
    with pytest.raises(KeyError, match="eval_personalized_mean_bleu.*eval_personalized_mean_accuracy"):
        trainer.train()


def test_best_evaluation_keeps_the_first_of_equal_scores_and_skips_non_finite():
    history = [
        {"round": 1, "eval_x": 0.5},
        {"round": 2},
        {"round": 3, "eval_x": float("nan")},
        {"round": 4, "eval_x": 0.7},
        {"round": 5, "eval_x": 0.7},
    ]
    assert best_evaluation(history, "x", greater_is_better=True) == (4, 0.7)
    assert best_evaluation(history, "eval_x", greater_is_better=False) == (1, 0.5)
    assert best_evaluation(history[1:3], "x", greater_is_better=True) is None


def test_activation_checkpointing_gives_the_same_update(tmp_path):
    clients, _ = make_clients({"client-a": 6, "client-b": 8})
    plain = build(tmp_path / "plain", clients)
    plain.train()
    checkpointed = build(tmp_path / "checkpointed", clients, activation_checkpointing=True)
    checkpointed.train()
    assert checkpointed.model.base_model.model.is_activation_checkpointing
    assert not plain.model.base_model.model.is_activation_checkpointing
    assert_states_close(checkpointed.global_state, plain.global_state, atol=1e-6)


def test_the_schedule_is_mapped_onto_the_trainers_step_fields(tmp_path):
    args = fed_args(tmp_path, num_rounds=6, eval_every_rounds=2, save_every_rounds=4)
    assert (str(args.eval_strategy.value), args.eval_steps) == ("steps", 2)
    assert (str(args.save_strategy.value), args.save_steps) == ("steps", 4)
    only_at_end = fed_args(tmp_path, num_rounds=6, eval_every_rounds=0, save_strategy="no")
    assert only_at_end.eval_steps == 6 and only_at_end.save_every_rounds == 0
    assert str(only_at_end.save_strategy.value) == "no"
    best = fed_args(tmp_path, save_every_rounds=1, load_best_model_at_end=True)
    assert best.metric_for_best_model == "personalized_mean_loss" and best.greater_is_better is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_strategy": "epoch"}, "eval_every_rounds"),
        ({"save_strategy": "best"}, "save_every_rounds"),
        ({"eval_steps": 3}, "eval_every_rounds"),
        ({"save_every_rounds": 2, "save_steps": 7}, "save_every_rounds"),
        ({"save_strategy": "no", "save_every_rounds": 3}, "contradicts"),
        ({"load_best_model_at_end": True, "save_every_rounds": 0}, "needs round checkpoints"),
        ({"load_best_model_at_end": True, "save_every_rounds": 3, "eval_every_rounds": 2}, "multiple"),
    ],
)
def test_loop_fields_that_contradict_the_rounds_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fed_args(tmp_path, **overrides)


def test_ignored_loop_fields_are_reported_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="peft_c2a.federated.arguments"):
        fed_args(tmp_path)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="peft_c2a.federated.arguments"):
        FederatedTrainingArguments(
            output_dir=str(tmp_path), num_train_epochs=5, max_steps=10, eval_on_start=True, report_to=[], use_cpu=True
        )
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "`num_train_epochs`" in text and "`max_steps`" in text and "`eval_on_start`" in text


@pytest.mark.parametrize("method", ["c2a", "lora"])
def test_evaluate_before_train_scores_the_starting_model_and_leaves_the_run_unchanged(tmp_path, method):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    uninterrupted = build(tmp_path / "plain", clients, evals, method=method, num_rounds=2)
    uninterrupted.train()
    trainer = build(tmp_path / "first", clients, evals, method=method, num_rounds=2)
    # what `eval_on_start` would give: the warning on that field points here
    before = trainer.evaluate()
    # the same seed, so the same starting weights; a client's descriptor is its training label mix
    model = tiny_model(method)
    by_hand = [
        evaluate_by_hand(model, evals[name], own_descriptor(clients[name]) if method == "c2a" else None)
        for name in evals
    ]
    assert before["eval_personalized_mean_loss"] == pytest.approx(sum(r["loss"] for r in by_hand) / 2, abs=1e-5)
    trainer.train()
    assert_states_close(trainer.global_state, uninterrupted.global_state)
    assert trainer.history[-1]["eval_personalized_mean_loss"] != pytest.approx(before["eval_personalized_mean_loss"])


def test_a_dict_of_global_test_sets_is_refused_with_where_the_data_belongs(tmp_path):
    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    with pytest.raises(ValueError, match="one dataset.*client_eval_datasets"):
        build(tmp_path, clients, evals, eval_dataset={"a": evals["client-a"]})
    trainer = build(tmp_path, clients, evals)
    with pytest.raises(ValueError, match="metric_key_prefix"):
        trainer.evaluate(eval_dataset={"a": evals["client-a"]})
    # one dataset is the global test set, scored under the prefix asked for
    metrics = trainer.evaluate(eval_dataset=evals["client-a"], metric_key_prefix="test_a")
    assert metrics["test_a_global_num_examples"] == 4
