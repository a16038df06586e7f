"""Evaluation in `FederatedTrainer`: the global test set with the uniform descriptor, every training client on its
own test split with its own descriptor (and, in the local-only baseline, its own state), and the unseen clients.

`FederatedEvaluation` is a mixin of `FederatedTrainer`; the summary it returns is built by
`metrics.evaluation_summary`, as the Flower strategy's is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from accelerate.utils import gather_object
from transformers import Trainer
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import EvalPrediction

from .clients import ClientData
from .metrics import (
    IGNORE_INDEX,
    classification_metrics,
    evaluation_summary,
    prior_logit_offsets,
    prior_only_accuracy,
    scalar_items,
)


def check_global_test_set(eval_dataset: Any) -> None:
    """A federation scores one global test set; the `Trainer`'s dict of named ones would each re-run every client's
    personalised evaluation, so it is refused with where the data belongs instead."""
    if isinstance(eval_dataset, Mapping):
        raise ValueError(
            "`eval_dataset` must be one dataset (the global test set), not a dict of datasets: clients' own test "
            "sets go in `client_eval_datasets`; to score several global test sets, call `evaluate(eval_dataset=...)` "
            "once for each with its own `metric_key_prefix`."
        )


class FederatedEvaluation(Trainer):
    """Per-client evaluation on a `Trainer` (a mixin of `FederatedTrainer`)."""

    def evaluate_federation(self, ignore_keys: Optional[list[str]] = None) -> dict[str, Any]:
        """Evaluate the current state: global, personalised (each client, own descriptor), unseen clients.

        Every process evaluates its share of the clients; all processes get the same result. Returns scalar
        summaries (`eval_global_*`, `eval_personalized_{mean,weighted,worst,std}_*`, `eval_unseen_*`) and the
        per-client scores under `eval_clients` and `eval_unseen_clients`. Beside the model's scores every client
        with labels gets `prior_only_accuracy`, the model-free guess of its majority training label (summarised as
        `eval_personalized_mean_prior_only_accuracy`, ...): the score a personalised model has to beat.
        """
        args = self.args
        local_mode = args.federation_mode == "local"
        jobs: list[tuple[str, str]] = []
        if self.eval_dataset is not None and not local_mode:
            jobs.append(("global", "global"))
        jobs += [("client", name) for name in self.training_clients if self.clients[name].eval_dataset is not None]
        if not local_mode:
            jobs += [("unseen", name) for name in self.unseen_clients if self.clients[name].eval_dataset is not None]
        results = []
        for kind, name in jobs[args.process_index :: args.world_size]:
            state = self.client_states.get(name, self.global_state) if local_mode else self.global_state
            self.load_trainable_state(self.client_state(name if kind == "client" else None, state))
            results.append((kind, name, self._evaluate_one(kind, name, ignore_keys)))
        if args.world_size > 1:
            results = gather_object(results)
        self.load_trainable_state(self.client_state(None, self.global_state))
        per_kind: dict[str, dict[str, dict[str, float]]] = {"global": {}, "client": {}, "unseen": {}}
        for kind, name, scores in results:
            per_kind[kind][name] = scores
        return evaluation_summary(per_kind["global"].get("global", {}), per_kind["client"], per_kind["unseen"])

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """`Trainer.evaluate` for a federation: the scalar scores of `evaluate_federation` (global, personalised,
        unseen, prior-only) under `metric_key_prefix`, logged, with `on_evaluate` fired for callbacks.

        `eval_dataset` replaces the global test set for this call (scored with the uniform descriptor).
        """
        check_global_test_set(eval_dataset)
        original = self.eval_dataset
        if eval_dataset is not None:
            self.eval_dataset = eval_dataset
        try:
            results = self.evaluate_federation(ignore_keys=ignore_keys)
        finally:
            self.eval_dataset = original
        metrics = {
            (f"{metric_key_prefix}_{key[len('eval_') :]}" if key.startswith("eval_") else key): value
            for key, value in scalar_items(results).items()
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluate_client(
        self, name: str, own_descriptor: bool = True, ignore_keys: Optional[list[str]] = None
    ) -> dict[str, float]:
        """Scores of the model's current state on client `name`'s evaluation data (`loss`, `accuracy`, `macro_f1`,
        `num_examples`, and `compute_metrics`' keys).

        With `own_descriptor=False` a C2A model sees no descriptor (the uniform one), as in the global evaluation.
        Raises `ValueError` if the client has no evaluation data.
        """
        if self._client(name).eval_dataset is None:
            raise ValueError(f"Client {name!r} has no evaluation dataset.")
        return self._evaluate_one("client" if own_descriptor else "uniform", name, ignore_keys)

    def _evaluate_one(self, kind: str, name: str, ignore_keys: Optional[list[str]]) -> dict[str, float]:
        steps = self.args.personalization_steps
        if not steps or kind not in ("client", "unseen"):
            return self._scores(kind, name, ignore_keys)
        # FedAvg-FT: fine-tune on the client's own data from the state it is evaluated with, score, put it back. Its
        # seed depends on the client only (round 0 of its own stream): a Flower node, which knows no round here,
        # fine-tunes exactly as the single-process trainer does
        state = self.get_trainable_state()
        try:
            self._run_local_training(name, 0, state, personalization_steps=steps)
            return self._scores(kind, name, ignore_keys)
        finally:
            self.load_trainable_state(state)

    def _scores(self, kind: str, name: str, ignore_keys: Optional[list[str]]) -> dict[str, float]:
        # the global test set is evaluated like a client without a descriptor (C2A: the uniform one)
        if kind == "global":
            client = ClientData("__global__", None, self.eval_dataset)
        elif kind == "uniform":
            client = ClientData(f"{name}/uniform", None, self._client(name).eval_dataset)
        else:
            client = self._client(name)
        loader = self._client_loader(client, None, train=False)
        model = self.model
        model.eval()
        next_token = _predicts_next_token(model)
        logits_all, labels_all, loss_sum, count, scored = None, None, 0.0, 0, 0
        for inputs in loader:
            batch_size = len(next(iter(inputs.values())))
            loss, logits, labels = self.prediction_step(
                model, inputs, prediction_loss_only=False, ignore_keys=ignore_keys
            )
            if loss is not None:
                loss_sum += float(loss) * batch_size
                count += batch_size
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            if self.preprocess_logits_for_metrics is not None and logits is not None:
                logits = self.preprocess_logits_for_metrics(logits, labels)
            if logits is not None:
                logits = logits.detach().cpu()
                logits_all = logits if logits_all is None else nested_concat(logits_all, logits, padding_index=-100)
            if labels is not None:
                labels = labels.detach().cpu()
                labels_all = labels if labels_all is None else nested_concat(labels_all, labels, padding_index=-100)
            scored += scored_positions(labels, batch_size, next_token)  # counted on the CPU copy made above
        scores: dict[str, float] = {}
        if count:
            scores["loss"] = loss_sum / count
        if logits_all is not None and labels_all is not None:
            logits_np, labels_np = nested_numpify(logits_all), nested_numpify(labels_all)
            label_ids = labels_np  # what `compute_metrics` gets, unshifted, beside the logits
            tau, counts = self.args.eval_logit_adjustment, client.label_counts
            if tau and kind in ("client", "unseen") and counts is not None and logits_np.shape[-1] == len(counts):
                logits_np = logits_np + prior_logit_offsets(counts, tau).astype(logits_np.dtype)
            predictions = logits_np.argmax(-1) if logits_np.ndim == labels_np.ndim + 1 else logits_np
            if next_token and predictions.ndim == 2 and predictions.shape == labels_np.shape:
                # a causal LM's logits at position t predict token t + 1 (its loss shifts the same way)
                predictions, labels_np = predictions[:, :-1], labels_np[:, 1:]
            if predictions.shape == labels_np.shape:
                scores.update(classification_metrics(predictions, labels_np))
                if kind == "global":  # how many classes the global model still predicts: 1 is a collapsed model
                    scores["predicted_classes"] = int(np.unique(predictions[labels_np != -100]).size)
                if client.label_counts is not None and kind in ("client", "unseen"):
                    scores["prior_only_accuracy"] = prior_only_accuracy(client.label_counts, labels_np)
            if self.compute_metrics is not None:
                extra = self.compute_metrics(EvalPrediction(predictions=logits_np, label_ids=label_ids))
                scores.update({key: float(value) for key, value in extra.items()})
        scores["num_examples"] = scored
        return scores

    def count_scored_examples(self, name: str) -> int:
        """How many predictions client `name`'s evaluation scores count (`num_examples` of `evaluate_client`), from
        its data alone: a Flower node announces it, and the server accepts scores over exactly that many."""
        client = self._client(name)
        if client.eval_dataset is None:
            return 0
        next_token = _predicts_next_token(self.model)
        total = 0
        for inputs in self._client_loader(client, None, train=False):
            labels = inputs.get(self.label_names[0]) if len(self.label_names) == 1 else None
            total += scored_positions(labels, len(next(iter(inputs.values()))), next_token)
        return total


def scored_positions(labels: Any, batch_size: int, next_token: bool) -> int:
    """How many predictions a batch is scored on: its labelled positions (-100 is ignored, and a causal LM's labels
    are shifted by one, as its predictions are), or its examples when it carries no labels."""
    if labels is None or isinstance(labels, (tuple, list)):
        return batch_size
    labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if next_token and labels.ndim == 2:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def _predicts_next_token(model: Any) -> bool:
    """Whether `model` is a causal language model (a PEFT `CAUSAL_LM` task, or a `...ForCausalLM` model)."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(configs, dict) and active in configs:
        task = getattr(configs[active], "task_type", None)
        if task is not None:
            return str(getattr(task, "value", task)) == "CAUSAL_LM"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForCausalLM") or type(base).__name__.endswith("LMHeadModel")
