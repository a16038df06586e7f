"""Per-round scalars reach `report_to="tensorboard"` with step = round, and per-client curves when asked for."""

from __future__ import annotations

import pytest

from peft_c2a.federated.reports import client_curves

from .test_federated_trainer import build, make_clients

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(logging_dir) -> dict[str, list[tuple[int, float]]]:
    runs = [path.parent for path in logging_dir.rglob("events.out.tfevents.*")]
    assert len(runs) == 1, runs
    accumulator = event_accumulator.EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


@pytest.mark.parametrize("log_client_scores", [False, True])
def test_the_event_file_holds_every_rounds_scalars(tmp_path, monkeypatch, log_client_scores):
    clients, evals = make_clients({"client-a": 6, "client-b": 8, "client-c": 5}, eval_size=4)
    logging_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logging_dir))  # transformers 5's place for it
    trainer = build(
        tmp_path / "out",
        clients,
        evals,
        num_rounds=3,
        report_to=["tensorboard"],
        log_client_scores=log_client_scores,
        unseen_clients=["client-c"],
    )
    trainer.train()
    scalars = read_scalars(logging_dir)
    history = trainer.history

    def curve(key):
        return [(record["round"], pytest.approx(record[key], rel=1e-6)) for record in history]

    assert scalars["train/train_loss"] == curve("train_loss")
    assert scalars["eval/personalized_mean_accuracy"] == curve("eval_personalized_mean_accuracy")
    assert scalars["eval/unseen_mean_accuracy"] == curve("eval_unseen_mean_accuracy")
    per_client = sorted(tag for tag in scalars if "clients/" in tag)
    if not log_client_scores:
        assert per_client == []
        return
    assert per_client == [
        "eval/clients/client-a/accuracy",
        "eval/clients/client-a/loss",
        "eval/clients/client-b/accuracy",
        "eval/clients/client-b/loss",
        "eval/unseen_clients/client-c/accuracy",
        "eval/unseen_clients/client-c/loss",
        "train/clients/client-a/train_loss",
        "train/clients/client-b/train_loss",
    ]
    assert scalars["eval/clients/client-b/accuracy"] == [
        (record["round"], pytest.approx(record["eval_clients"]["client-b"]["accuracy"], rel=1e-6)) for record in history
    ]


def test_client_curves_flattens_a_record():
    record = {
        "eval_clients": {"b": {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4}, "a": {"accuracy": 1.0}},
        "client_train_loss": {"a": 0.25},
    }
    assert client_curves(record) == {
        "eval_clients/a/accuracy": 1.0,
        "eval_clients/b/accuracy": 0.5,
        "eval_clients/b/loss": 1.0,
        "clients/a/train_loss": 0.25,
    }
    assert client_curves({"round": 1}) == {}
