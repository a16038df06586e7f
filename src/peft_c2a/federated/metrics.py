"""Metrics of a federation: classification scores, per-client summaries, and the history files.

Accuracy and macro-F1 come from scikit-learn (`accuracy_score`, `f1_score(average="macro")`): a maintained, widely
used definition rather than one written here, and it needs no network, whereas `evaluate.load("f1")` fetches its
metric script from the Hub and fails offline. Classes are the union of true and predicted labels, as in scikit-learn;
a class with no true and no predicted example does not count. Any `evaluate` metric can be added on top through
`compute_metrics_from_evaluate`, which turns it into a `compute_metrics` callable.

Per-client results are summarised the way federated papers report them: mean over clients, example-weighted mean,
worst client, and standard deviation across clients.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # only an annotation: the module stays importable without loading transformers
    from transformers.trainer_utils import EvalPrediction

IGNORE_INDEX = -100
PLOTTED_METRICS = (
    ("eval_global_accuracy", "global (uniform descriptor)"),
    ("eval_personalized_mean_accuracy", "personalised mean"),
    ("eval_personalized_worst_accuracy", "personalised worst client"),
    ("eval_unseen_mean_accuracy", "unseen clients mean"),
)


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids against labels (positions labelled -100 are ignored).

    Both arrays are flattened, so token-level predictions score like sequence-level ones. With no labelled position
    left the scores are NaN (and `num_examples` 0): `summarize_clients` then leaves that client out of the mean.
    """
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape.")
    keep = labels != IGNORE_INDEX
    predictions, labels = predictions[keep], labels[keep]
    if labels.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "num_examples": 0}
    # imported here: scikit-learn pulls in scipy, which `import peft_c2a.federated` need not pay for
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        # zero_division=0: a class only ever predicted (never true) scores 0 instead of warning
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "num_examples": int(labels.size),
    }


def compute_metrics_from_evaluate(
    metric: Any, *, prefix: str = "", shift_labels: bool = False, **compute_kwargs: Any
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` callable (for `FederatedTrainer` or `Trainer`) that scores with an `evaluate` metric.

    The callable takes class ids from the logits (argmax over the last axis; predictions that already are ids, e.g.
    from `preprocess_logits_for_metrics`, are used as they are), drops the positions labelled -100, calls
    `metric.compute(predictions=..., references=..., **compute_kwargs)` and returns its scores as floats under
    `prefix + key`. A list-valued score (e.g. per-class F1 with `average=None`) becomes one key per class,
    `f"{prefix}{key}_{i}"`.

    Args:
        metric: an `evaluate.EvaluationModule` (`evaluate.load("accuracy")`, or a local metric folder
            `evaluate.load("examples/metrics/macro_f1")`) or an `evaluate.combine([...])`; anything with a
            `compute(predictions=..., references=...)` that returns a dict works.
        prefix: put before every key. `FederatedTrainer` merges these keys into each client's scores, so a key equal
            to a built-in one (`accuracy`, `macro_f1`, `loss`) would replace it; a prefix such as `"metric_"` keeps
            both.
        shift_labels: score next-token predictions of a causal LM. `FederatedTrainer` passes `compute_metrics` the
            label ids as the batch holds them (unshifted), while the logits at position t predict token t + 1: with
            `shift_labels=True` the predictions at positions `[:-1]` are compared with the labels at `[1:]`, as the
            built-in accuracy of a causal LM is.
        compute_kwargs: passed on to `metric.compute`, e.g. `average="macro"` for `evaluate.load("f1")`.
    """

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits, labels = prediction.predictions, prediction.label_ids
        if isinstance(logits, (tuple, list)):  # a model's extra outputs (hidden states, ...) follow the logits
            logits = logits[0]
        logits, labels = np.asarray(logits), np.asarray(labels)
        predictions = logits.argmax(-1) if logits.ndim == labels.ndim + 1 else logits
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape.")
        if shift_labels:
            predictions, labels = predictions[..., :-1], labels[..., 1:]
        keep = labels != IGNORE_INDEX
        references, predictions = labels[keep].tolist(), predictions[keep].tolist()
        if not references:  # nothing to score (every position ignored): no keys, as for a client without labels
            return {}
        scores = metric.compute(predictions=predictions, references=references, **compute_kwargs)
        if scores is None:
            raise ValueError(
                "The metric returned no scores: an `evaluate` module with process_id != 0 computes nothing; load it "
                "with the default process_id=0 (each process scores its own clients)."
            )
        return _float_scores(scores, prefix)

    return compute_metrics


def _float_scores(scores: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in scores.items():
        array = np.asarray(value)
        if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
            out[f"{prefix}{key}"] = float(array)
        elif array.ndim == 1 and np.issubdtype(array.dtype, np.number):
            out.update({f"{prefix}{key}_{index}": float(item) for index, item in enumerate(array)})
        else:
            raise TypeError(f"Metric score {key!r} is neither a number nor a list of numbers: {value!r}.")
    return out


def prior_only_accuracy(train_label_counts: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the model-free guess "always the client's majority training label" on `labels`.

    Under label skew a personal test split follows the client's training mix, so this guess alone can score high;
    a personalised model is only worth its cost where it beats it. Ties go to the smallest class id; positions
    labelled -100 are ignored.
    """
    labels = np.asarray(labels).reshape(-1)
    labels = labels[labels != -100]
    if labels.size == 0:
        return float("nan")
    return float(np.mean(labels == int(np.argmax(train_label_counts))))


def prior_logit_offsets(train_label_counts: np.ndarray, tau: float, eps: float = 0.01) -> np.ndarray:
    """`tau * log(p + eps)`, centred over the classes, of a client's training label distribution `p`: what
    `eval_logit_adjustment` adds to a global classifier's scores (C2A's own logit adjustment, applied post hoc)."""
    counts = np.asarray(train_label_counts, dtype=np.float64)
    log_prior = np.log(counts / max(counts.sum(), 1e-12) + eps)
    return tau * (log_prior - log_prior.mean())


def summarize_clients(per_client: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
    """Mean, example-weighted mean, worst client and std across clients of each score in `per_client`.

    Args:
        per_client: client name -> its scores (must include `num_examples`).
        prefix: e.g. `"eval_personalized"`; keys come out as `f"{prefix}_{stat}_{score}"`.
    """
    if not per_client:
        return {}
    scores = sorted({key for values in per_client.values() for key in values if key != "num_examples"})
    summary: dict[str, float] = {f"{prefix}_num_clients": len(per_client)}
    for score in scores:
        pairs = [
            (float(values[score]), float(values.get("num_examples", 1)))
            for values in per_client.values()
            if score in values and math.isfinite(float(values[score]))
        ]
        if not pairs:
            continue
        values, weights = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        summary[f"{prefix}_mean_{score}"] = float(values.mean())
        summary[f"{prefix}_weighted_{score}"] = float((values * weights).sum() / max(weights.sum(), 1e-12))
        summary[f"{prefix}_worst_{score}" if score != "loss" else f"{prefix}_max_{score}"] = float(
            values.max() if score == "loss" else values.min()
        )
        summary[f"{prefix}_std_{score}"] = float(values.std())
    return summary


def evaluation_summary(
    global_scores: Mapping[str, float],
    seen: Mapping[str, Mapping[str, float]],
    unseen: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """One evaluation's record, the same for both engines: `eval_global_*` from `global_scores`,
    `eval_personalized_*` summarised over the training clients (`seen`), `eval_unseen_*` over the unseen ones, and
    the per-client scores under `eval_clients` / `eval_unseen_clients`."""
    out: dict[str, Any] = {f"eval_global_{key}": value for key, value in global_scores.items()}
    out.update(summarize_clients(seen, "eval_personalized"))
    out.update(summarize_clients(unseen, "eval_unseen"))
    out["eval_clients"] = dict(sorted(seen.items()))
    if unseen:
        out["eval_unseen_clients"] = dict(sorted(unseen.items()))
    return out


def pooled_scores(per_client: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`loss` and `accuracy` over the union of the clients' examples (each client's score weighted by its
    `num_examples`), and that union's size: a global score where no server-side test set exists."""
    out: dict[str, float] = {}
    pooled = sum(scores.get("num_examples", 0.0) for scores in per_client.values())
    for score in ("loss", "accuracy"):
        pairs = [(s[score], s.get("num_examples", 0.0)) for s in per_client.values() if score in s]
        if pairs and pooled:
            out[score] = sum(value * weight for value, weight in pairs) / pooled
    if per_client:
        out["num_examples"] = pooled
    return out


def headline(record: Mapping[str, Any]) -> str:
    """A round in one line: its training loss and main accuracies."""
    keys = ("train_loss", "eval_global_accuracy", "eval_personalized_mean_accuracy", "eval_personalized_worst_accuracy")
    return ", ".join(f"{key}={record[key]:.4f}" for key in keys if key in record)


def scalar_items(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, non-nested entries of a history record (what goes to loggers and the CSV)."""
    return {
        key: value for key, value in record.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


_QUIET_SUFFIXES = ("_num_examples", "_max_loss")
# the weighted means and spreads over clients of every score but accuracy (built-in or `compute_metrics`') stay in
# history.json: the console and the loggers get the accuracy summaries and the other scores' mean and worst
_QUIET_SUMMARIES = ("_weighted_", "_std_")
_QUIET_KEYS = {
    "num_sampled_clients",
    "num_train_examples",
    "local_steps",
    "bytes_up_per_client",
    "train_time",
    "eval_time",
    "wall_time",
}


def loggable_items(record: Mapping[str, Any]) -> dict[str, float]:
    """The headline scalars of a history record, for the Trainer's loggers and the console (the rest stays in
    `history.json`)."""
    return {
        key: value
        for key, value in scalar_items(record).items()
        if key not in _QUIET_KEYS
        and not key.endswith(_QUIET_SUFFIXES)
        and not (any(part in key for part in _QUIET_SUMMARIES) and not key.endswith("_accuracy"))
    }


def write_history(history: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, plot: bool = True) -> None:
    """Write `history.json` (one dict per round), `history.csv` (its scalar columns) and `accuracy.png`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(output_dir / "history.json", json.dumps(list(history), indent=1, default=_json_default))
    rows = [scalar_items(record) for record in history]
    columns = ["round"] + sorted({key for row in rows for key in row} - {"round"})
    tmp = output_dir / "history.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, output_dir / "history.csv")
    if plot:
        plot_history(history, output_dir / "accuracy.png")


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
    """Draw accuracy vs round (global, personalised mean and worst, unseen) to a PNG; `None` if nothing to draw."""
    series = {
        label: [(r["round"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        for key, label in PLOTTED_METRICS
    }
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in series.items():
        rounds, values = zip(*points, strict=True)
        axis.plot(rounds, values, marker="o", label=label)
    axis.set_xlabel("round")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
