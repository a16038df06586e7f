"""`compute_metrics_from_evaluate` and the shipped local `evaluate` metric (`examples/metrics/macro_f1`), offline.

The local metric is the offline route to `evaluate`: a Hub name needs the network, a folder holding a script of the
same name does not. These tests load it with the Hub switched off and check it against the built-in macro-F1, then run
it through `FederatedTrainer` as a `compute_metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peft import get_peft_model
from transformers import default_data_collator
from transformers.trainer_utils import EvalPrediction

import peft_c2a
from peft_c2a.federated import FederatedTrainer, classification_metrics, compute_metrics_from_evaluate

from ..federated_utils import fed_args, skewed_clients, tiny_model
from ..tuner.test_generation import tiny_gpt2
from .test_causal_lm import token_streams

evaluate = pytest.importorskip("evaluate")  # the `metrics` extra (part of `dev`)

MACRO_F1 = Path(__file__).resolve().parents[2] / "examples" / "metrics" / "macro_f1"


@pytest.fixture
def offline(monkeypatch):
    """No Hub: the environment variables, and the flags the libraries read from them at import time."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


@pytest.fixture
def macro_f1(offline):
    return evaluate.load(str(MACRO_F1), keep_in_memory=True)


class RecordingMetric:
    """A stand-in `evaluate` module: records what `compute` receives, returns fixed scores."""

    def __init__(self, scores=None):
        self.calls: list[dict] = []
        self.scores = {"score": 0.5} if scores is None else scores

    def compute(self, **kwargs):
        self.calls.append(kwargs)
        return self.scores


# ---- the local metric ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_local_macro_f1_loads_offline_and_agrees_with_classification_metrics(macro_f1, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=40)
    predictions = np.where(rng.random(40) < 0.6, labels, rng.integers(0, 3, size=40))  # classes 3..5 rarely right
    got = macro_f1.compute(predictions=predictions.tolist(), references=labels.tolist())
    assert got == {"macro_f1": pytest.approx(classification_metrics(predictions, labels)["macro_f1"], abs=1e-12)}


def test_local_macro_f1_known_value_and_script_path(macro_f1, offline):
    # class 0: F1 = 2*2/(2+3) = 0.8; class 2 is predicted, never true: 0 -> (0.8 + 0) / 2
    assert macro_f1.compute(predictions=[0, 0, 2], references=[0, 0, 0]) == {"macro_f1": pytest.approx(0.4)}
    by_script = evaluate.load(str(MACRO_F1 / "macro_f1.py"), keep_in_memory=True)
    assert by_script.compute(predictions=[1, 0], references=[1, 0]) == {"macro_f1": 1.0}


# ---- compute_metrics_from_evaluate ---------------------------------------------------------------------------------


def test_helper_takes_the_argmax_and_drops_ignored_positions(macro_f1):
    labels = np.array([[0, 1, -100], [2, -100, 1]])
    predicted = np.array([[0, 1, 2], [2, 0, 0]])  # the ignored positions are wrong on purpose
    logits = np.eye(3)[predicted] * 5.0  # (2, 3, 3): argmax over the last axis is `predicted`
    compute_metrics = compute_metrics_from_evaluate(macro_f1)
    scores = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    expected = classification_metrics(predicted, labels)["macro_f1"]  # ignores -100 as well
    assert scores == {"macro_f1": pytest.approx(expected, abs=1e-12)}

    recorder = RecordingMetric()
    compute_metrics_from_evaluate(recorder)(EvalPrediction(predictions=logits, label_ids=labels))
    assert recorder.calls == [{"predictions": [0, 1, 2, 0], "references": [0, 1, 2, 1]}]


def test_helper_passes_kwargs_prefixes_keys_and_accepts_ids_and_tuples():
    recorder = RecordingMetric({"f1": np.float64(0.25), "per_class": np.array([1.0, 0.0]), "n": 3})
    compute_metrics = compute_metrics_from_evaluate(recorder, prefix="metric_", average="macro")
    ids = np.array([1, 0, 1])  # already class ids (e.g. after preprocess_logits_for_metrics)
    scores = compute_metrics(EvalPrediction(predictions=(ids, np.zeros((3, 4))), label_ids=np.array([1, 1, -100])))
    assert recorder.calls == [{"predictions": [1, 0], "references": [1, 1], "average": "macro"}]
    assert scores == {"metric_f1": 0.25, "metric_per_class_0": 1.0, "metric_per_class_1": 0.0, "metric_n": 3.0}
    assert all(type(value) is float for value in scores.values())
    # every position ignored: nothing to score, and the metric is not called
    assert compute_metrics(EvalPrediction(predictions=ids, label_ids=np.full(3, -100))) == {}
    assert len(recorder.calls) == 1


def test_helper_shifts_labels_for_next_token_prediction():
    tokens = np.array([[5, 6, 7, 8]])
    next_token_logits = np.eye(10)[np.array([[6, 7, 8, 0]])]  # position t predicts token t + 1
    recorder = RecordingMetric()
    compute_metrics_from_evaluate(recorder, shift_labels=True)(
        EvalPrediction(predictions=next_token_logits, label_ids=tokens)
    )
    assert recorder.calls[-1] == {"predictions": [6, 7, 8], "references": [6, 7, 8]}


def test_helper_errors():
    prediction = EvalPrediction(predictions=np.array([0, 1]), label_ids=np.array([0, 1]))
    silent = RecordingMetric()
    silent.scores = None  # what an `evaluate` module with process_id != 0 returns
    with pytest.raises(ValueError, match="process_id"):
        compute_metrics_from_evaluate(silent)(prediction)
    with pytest.raises(TypeError, match="'label'"):
        compute_metrics_from_evaluate(RecordingMetric({"label": "spam"}))(prediction)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics_from_evaluate(RecordingMetric())(
            EvalPrediction(predictions=np.zeros((2, 3, 4)), label_ids=np.array([0, 1]))
        )


def test_helper_with_combined_modules(macro_f1):
    combined = evaluate.combine([macro_f1], force_prefix=True)
    scores = compute_metrics_from_evaluate(combined)(
        EvalPrediction(predictions=np.array([0, 0, 2]), label_ids=np.array([0, 0, 0]))
    )
    assert scores == {"macro_f1_macro_f1": pytest.approx(0.4)}


# ---- through FederatedTrainer --------------------------------------------------------------------------------------


def test_trainer_reports_the_metric_per_client_and_in_the_summaries(tmp_path, macro_f1):
    clients, client_tests = skewed_clients()
    trainer = FederatedTrainer(
        tiny_model("c2a"),
        fed_args(tmp_path, num_rounds=1, local_max_steps=2),
        clients,
        client_tests,
        eval_dataset=client_tests["client-0"],
        data_collator=default_data_collator,
        compute_metrics=compute_metrics_from_evaluate(macro_f1, prefix="metric_"),
    )
    trainer.train()
    record = trainer.history[-1]
    for name, scores in record["eval_clients"].items():
        assert scores["metric_macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-12), name
    for key in ("eval_global", "eval_personalized_mean", "eval_personalized_worst"):
        assert record[f"{key}_metric_macro_f1"] == pytest.approx(record[f"{key}_macro_f1"], abs=1e-12)
    assert "eval_personalized_mean_metric_macro_f1" in trainer.evaluate()


def test_trainer_causal_lm_metric_with_shifted_labels_matches_the_built_in(tmp_path, macro_f1):
    model = get_peft_model(tiny_gpt2(), peft_c2a.BottleneckAdapterConfig(task_type="CAUSAL_LM", bottleneck_dim=4))
    clients = {"a": token_streams(0), "b": token_streams(1)}
    shifted = compute_metrics_from_evaluate(macro_f1, prefix="shifted_", shift_labels=True)
    unshifted = compute_metrics_from_evaluate(macro_f1, prefix="unshifted_")
    trainer = FederatedTrainer(
        model,
        fed_args(tmp_path),
        clients,
        {"a": token_streams(2)},
        data_collator=default_data_collator,
        compute_metrics=lambda prediction: {**shifted(prediction), **unshifted(prediction)},
    )
    scores = trainer.evaluate_client("a")
    assert scores["shifted_macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-12)
    assert scores["unshifted_macro_f1"] != pytest.approx(scores["macro_f1"], abs=1e-6)
