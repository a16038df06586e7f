"""The Flower wire protocol: every message survives an encode / decode round trip, and what a node may not claim
(impossible scores, unusable example counts) is refused."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from transformers import default_data_collator

from peft_c2a.federated import CheckpointError, FederatedTrainer
from peft_c2a.federated.server import ClientReport
from peft_c2a.flower import FederatedStrategy
from peft_c2a.flower.client_app import _scored_examples
from peft_c2a.flower.protocol import (
    OWN_PASS,
    UNIFORM_PASS,
    Instruction,
    NodeDescription,
    decode_evaluate,
    decode_evaluate_reply,
    decode_node_description,
    decode_query_reply,
    decode_train,
    decode_train_reply,
    encode_evaluate,
    encode_evaluate_reply,
    encode_query_reply,
    encode_train,
    encode_train_reply,
    state_to_record,
    train_report_problem,
)

from ..federated_utils import fed_args, skewed_clients, tiny_model
from ..flower_utils import federation_settings


def test_messages_round_trip():
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    description = NodeDescription(["a", "b"], [3, 4], [5, 0], 7)
    assert decode_query_reply(encode_query_reply(description)) == description
    assert description.evaluable == [True, False]

    instruction = Instruction(3, 7, "fedprox", 0.01, ["a"], [4], {"note": "x"})
    decoded_state, decoded = decode_train(encode_train(state_to_record(state), instruction))
    assert torch.equal(decoded_state["w"], state["w"]) and decoded == instruction
    instruction = Instruction(3, 7, "fedavg", None, ["a", "b"], [0, 1])
    assert decode_evaluate(encode_evaluate(state_to_record(state), instruction))[1] == instruction
    instruction = Instruction(4, 7, "fedavg", None, ["a"], [0], {"note": "x"}, oldest_resume_round=2)
    assert decode_train(encode_train(state_to_record(state), instruction))[1] == instruction

    report = ClientReport("a", "ok", bytes_down=24, num_examples=3, train_loss=0.5, local_steps=2)
    decoded_report, update = decode_train_reply(encode_train_reply(report, state), bytes_down=24)
    assert torch.equal(update["w"], state["w"])
    assert decoded_report == ClientReport("a", "ok", 24, 24, 3, 0.5, 2, None)
    failed, none = decode_train_reply(encode_train_reply(ClientReport("a", "failed", error="boom"), None), 24)
    assert (failed.status, failed.error, none) == ("failed", "boom", None)


def test_impossible_evaluation_scores_are_refused():
    good = {"accuracy": 0.5, "loss": 0.7, "num_examples": 4.0}
    reply = encode_evaluate_reply(
        {
            (OWN_PASS, "a"): good,
            (UNIFORM_PASS, "a"): good,
            (OWN_PASS, "b"): {**good, "accuracy": 5.0},
            (UNIFORM_PASS, "b"): good,
            (OWN_PASS, "c"): {**good, "num_examples": -3.0},
            (OWN_PASS, "d"): {**good, "loss": float("nan")},
            (OWN_PASS, "e"): {**good, "num_examples": float("inf")},
            (UNIFORM_PASS, "e"): {**good, "num_examples": float("inf")},
            (OWN_PASS, "f"): good,  # no uniform pass: it would count personalised but not global
            (OWN_PASS, "g"): good,
            (UNIFORM_PASS, "g"): {**good, "num_examples": 4000.0},  # would decide the pooled global score
            (OWN_PASS, "stranger"): good,
        },
        {},
    )
    scores, failed = decode_evaluate_reply(reply, dict.fromkeys("abcdefg", 4), node=9)
    assert scores[OWN_PASS] == {"a": good} and scores[UNIFORM_PASS] == {"a": good}
    assert sorted(failed) == ["b", "c", "d", "e", "f", "g"] and "accuracy=5.0" in failed["b"]
    assert "num_examples=inf" in failed["e"] and "no uniform pass" in failed["f"]
    assert "inconsistent scores from node 9: the passes count [4.0, 4000.0]" in failed["g"]
    # a model without a descriptor runs the own pass only: one pass is complete
    scores, failed = decode_evaluate_reply(reply, dict.fromkeys("af", 4), node=9, passes=(OWN_PASS,))
    assert scores[OWN_PASS] == {"a": good, "f": good} and failed == {}
    # both passes agree, but on more examples than the node announced at query: it would outweigh the others in the
    # pooled global score
    scores, failed = decode_evaluate_reply(reply, {"a": 3}, node=9)
    assert scores == {OWN_PASS: {}, UNIFORM_PASS: {}}
    assert failed == {"a": "inconsistent scores from node 9: 4.0 examples scored, 3 announced"}


@pytest.mark.parametrize("field", ["num-examples", "num-test-examples", "seed"])
def test_a_non_finite_number_in_a_client_description_is_a_malformed_description(field):
    description = {"names": ["a"], "num-examples": [5], "num-test-examples": [2], "seed": 0}
    description[field] = float("inf") if field == "seed" else [float("inf")]
    with pytest.raises(ValueError, match="malformed client description"):
        decode_node_description(description)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num-test-examples": [-1]}, "negative test-example counts \\[-1\\]"),
        ({"num-test-examples": [2, 3]}, "differ in length"),
        ({"num-test-examples": None}, "malformed client description"),
    ],
)
def test_a_client_description_must_announce_every_test_set(change, message):
    description = {"names": ["a"], "num-examples": [5], "num-test-examples": [2], "seed": 0, **change}
    if change["num-test-examples"] is None:
        del description["num-test-examples"]
    with pytest.raises(ValueError, match=message):
        decode_node_description(description)


def test_malformed_train_replies_are_the_nodes_failure():
    content = RecordDict(
        {
            "arrays": state_to_record({"w": torch.zeros(2)}),
            "metrics": MetricRecord({"num-examples": 3}),  # no loss, no steps
            "config": ConfigRecord({"client": "a", "status": "ok", "error": ""}),
        }
    )
    report, update = decode_train_reply(content, bytes_down=8)
    assert report.status == "rejected" and "malformed" in report.error and update is None


@pytest.mark.parametrize(
    "change, problem",
    [
        ({}, None),
        (
            {"num_examples": 10_000},
            "example count 10000 differs from the 3 the node announced (it would change the client's weight in the "
            "average)",
        ),
        ({"train_loss": float("inf")}, "non-finite training loss inf"),
        ({"local_steps": -4}, "negative local steps -4"),
    ],
)
def test_a_train_reports_metrics_must_be_possible(change, problem):
    report = ClientReport("a", "ok", num_examples=3, train_loss=0.5, local_steps=2)
    for key, value in change.items():
        setattr(report, key, value)
    assert train_report_problem(report, announced_examples=3) == problem


@pytest.mark.parametrize("count", [0, -23])
def test_a_node_announcing_no_examples_is_refused(tmp_path, count):
    strategy = FederatedStrategy(tiny_model("c2a"), fed_args(tmp_path, **federation_settings()))
    description = {"names": ["a", "b"], "num-examples": [5, count], "num-test-examples": [2, 2], "seed": 0}
    with pytest.raises(ValueError, match=f"announces {count} training examples"):
        strategy.register_clients({1: description})


def test_the_strategy_refuses_another_runs_checkpoints_on_a_fresh_start(tmp_path):
    strategy = FederatedStrategy(tiny_model("c2a"), fed_args(tmp_path, **federation_settings()))
    description = {"names": ["a", "b"], "num-examples": [5, 5], "num-test-examples": [2, 2], "seed": 0}
    strategy.register_clients({1: description})
    strategy.save_checkpoint(1)
    fresh = FederatedStrategy(tiny_model("c2a"), fed_args(tmp_path, **federation_settings()))
    with pytest.raises(CheckpointError, match="another run.*overwrite_output_dir"):
        fresh.server.checkpoint_to_resume(None)
    overwriting = FederatedStrategy(
        tiny_model("c2a"), fed_args(tmp_path, **federation_settings(), overwrite_output_dir=True)
    )
    assert overwriting.server.checkpoint_to_resume(None) is None
    assert not (tmp_path / "round-1").exists()


def test_a_node_whose_test_data_cannot_be_collated_says_which_client_before_round_1(tmp_path):
    train, test = skewed_clients(2)
    test["client-1"] = Dataset.from_dict({"input_ids": [[5, 6, 7], [5]], "labels": [0, 1]})  # ragged
    trainer = FederatedTrainer(tiny_model("c2a"), fed_args(tmp_path), train, test, data_collator=default_data_collator)
    assert _scored_examples(trainer, "client-0") == 12
    with pytest.raises(ValueError, match="The test data of client 'client-1' cannot be read for evaluation"):
        _scored_examples(trainer, "client-1")
