"""`FederatedTrainer`: a `transformers.Trainer` that runs a federation of clients instead of one training run.

One round: sample clients (seeded by the round), and for each sampled client load the global trainable state,
train locally with the Trainer's own machinery (`training_step`, `compute_loss`, optimizer and scheduler factories,
gradient accumulation, mixed precision through accelerate), and return `local - global` with the client's example
count; the server averages the updates by example count and applies them (FedAvg / FedProx / FedAdam / FedYogi);
then evaluate, log and checkpoint.

Design choices worth knowing:
- *Clients, not batches, are distributed.* Under `accelerate launch` or `torchrun` every process trains its share
  of the round's clients on its own (no DDP); their updates' weighted sums are all-reduced once per round (robust
  aggregations gather the updates). Local training is seeded from `(seed, round, client)`, so the result is the same
  with any number of processes and after resuming.
- *The trainable state is what communicates.* Whatever `requires_grad` -- a C2A hypernetwork, bottleneck or LoRA
  weights, a classifier head, prompt embeddings -- is sent down, trained, and sent back. Any PEFT model (or a plain
  model with some parameters frozen) works; only C2A models get client descriptors.
- *Descriptors are local.* A C2A client's label distribution is computed from its own training labels and attached
  to its batches by a collator; the server never needs it.
- *Per-client tensors stay on their client.* C2A's client-id embedding table (`private_parameter_names`) is neither
  sent nor averaged: each client trains and keeps its own copy (`client_private_states`, checkpointed), and the
  global state holds only the shared tensors. Averaged, a client's row would shrink to n_k / sum(n) of its update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate.utils import gather_object
from peft import PeftModel
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import EvalPrediction, IntervalStrategy, TrainOutput

from .arguments import FederatedTrainingArguments
from .best_round import best_evaluation, check_metric_present
from .callback_states import export_callback_states, restore_callback_states
from .checkpoint import (
    CLIENT_PRIVATE_FILE,
    CLIENT_STATES_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    CheckpointError,
    checkpoint_dir,
    indexed_states,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_states_from_json,
    rng_states_to_json,
    unindexed_states,
)
from .clients import ClientData, build_clients, data_fingerprint, descriptor_spec, expected_num_labels
from .evaluation import FederatedEvaluation, check_global_test_set
from .local_training import POOLED_CLIENT, LocalTraining, unwrap_optimizer
from .metrics import loggable_items, scalar_items
from .reports import client_curves, run_summary
from .rounds import (
    adapter_fingerprint,
    load_trainable_state,
    private_parameter_names,
    trainable_parameters,
    trainable_state,
)
from .server import ClientReport, FederationServer, ServerBacked, ServerCheckpoint
from .sharing import HubSharing

logger = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


class FederatedTrainer(ServerBacked, HubSharing, FederatedEvaluation, LocalTraining, Trainer):
    """A `Trainer` that fine-tunes one model across many clients by federated rounds.

    Args:
        model: the model to federate: a `PeftModel` (C2A, bottleneck, LoRA, IA3, prefix tuning ...) or any model whose
            trainable parameters are the ones to share. For a C2A model every client's descriptor is computed from its
            own training labels and passed with its batches.
        args: a `FederatedTrainingArguments`.
        client_datasets: client name -> its (tokenised) training dataset, with a label column.
        client_eval_datasets: client name -> its own test dataset, for personalised evaluation with its own
            descriptor (and own state in the local-only baseline).
        eval_dataset: a global test set, evaluated with the global state and no descriptor (C2A: uniform).
        unseen_clients: names in `client_datasets` that never train: they are evaluated on their
            `client_eval_datasets` entry with a descriptor computed from their own training labels (clients that
            join after training).
        processing_class, data_collator, compute_metrics, callbacks, preprocess_logits_for_metrics: as in `Trainer`.
            `compute_metrics` (if given) is called once per evaluated client; its scores are summarised like the
            built-in accuracy and macro-F1.

    Raises:
        ValueError: bad input found before any training: no clients, an empty client, labels outside
            `[0, num_labels)`, a descriptor column of the wrong width, unknown unseen clients, ...
    """

    def __init__(
        self,
        model: nn.Module,
        args: FederatedTrainingArguments,
        client_datasets: Mapping[str, Any],
        client_eval_datasets: Optional[Mapping[str, Any]] = None,
        eval_dataset: Any = None,
        unseen_clients: Optional[Sequence[str]] = None,
        processing_class: Any = None,
        data_collator: Optional[Callable] = None,
        compute_metrics: Optional[Callable[[EvalPrediction], dict]] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple[Optional[torch.optim.Optimizer], Any] = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
    ) -> None:
        if not isinstance(args, FederatedTrainingArguments):
            raise TypeError(f"`args` must be a FederatedTrainingArguments, got {type(args).__name__}.")
        if optimizers[0] is not None and args.reset_optimizer_each_round:
            raise ValueError(
                "A ready-made optimizer cannot be rebuilt for every client: choose it with `optim` / `optim_args`, "
                "override `create_optimizer`, or set `reset_optimizer_each_round=False`."
            )
        check_global_test_set(eval_dataset)
        # the Trainer wants a global `eval_dataset` for an evaluation schedule; a federation evaluates its clients
        eval_strategy, args.eval_strategy = args.eval_strategy, IntervalStrategy.NO
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        finally:
            args.eval_strategy = eval_strategy
        self.args: FederatedTrainingArguments
        # Local losses are per-batch means: most models ignore `num_items_in_batch` even though their forward takes
        # `**kwargs`, so let `training_step` divide by the accumulation steps (transformers #47688).
        self.model_accepts_loss_kwargs = False
        self.descriptor_spec = descriptor_spec(self.model)
        self.num_labels = expected_num_labels(self.model, self.descriptor_spec)
        self.clients: dict[str, ClientData] = build_clients(
            client_datasets, client_eval_datasets, self.descriptor_spec, self.num_labels
        )
        # C2A's client-id embedding: each federated client keeps its own copy (`client_state`)
        self.private_keys = private_parameter_names(model) if args.federation_mode == "federated" else frozenset()
        # the server side of the federation: roster, global state, server optimizer, history, checkpoints. It starts
        # from the model as given, so `evaluate()` before `train()` scores the starting point (`eval_on_start`)
        self.server = FederationServer(args, self._shared_state(), is_writer=self.is_world_process_zero())
        self.server.set_roster(self.clients, list(unseen_clients or []), where="missing from `client_datasets`")
        args.check_processes()
        if args.federation_mode == "centralized":
            self._pooled_client = ClientData(POOLED_CLIENT, self._pool_training_clients())
        # datasets with the model's unused columns removed, made once per dataset instead of every round
        self._prepared: dict[tuple[str, bool], tuple[Any, Any]] = {}
        self.client_states: dict[str, TensorDict] = {}
        self._initial_private_state: TensorDict = {
            name: param.detach().to("cpu", copy=True)
            for name, param in model.named_parameters()
            if name in self.private_keys
        }
        self.client_private_states: dict[str, TensorDict] = {}
        self._proximal_anchor: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    # ---- the trainable state -------------------------------------------------------------------------------------

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        return trainable_parameters(self.model)

    def get_trainable_state(self) -> TensorDict:
        """A CPU copy of every trainable tensor of the model (what a round sends down and gets back)."""
        return trainable_state(self.model)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` into the model's trainable parameters (names and shapes must match exactly)."""
        load_trainable_state(self.model, state)

    def _shared_state(self) -> TensorDict:
        """The model's trainable state less the client-private tensors: what the server holds and averages."""
        return {k: v for k, v in self.get_trainable_state().items() if k not in self.private_keys}

    def client_state(self, name: Optional[str], shared_state: Mapping[str, torch.Tensor]) -> TensorDict:
        """The whole trainable state client `name` runs with: `shared_state` plus the client's private tensors.

        A client that has not trained yet, and `name=None` (the global model), get the initial private tensors.
        A `shared_state` that already holds them (a local-only client's own state) is returned as it is.
        """
        missing = [key for key in self.private_keys if key not in shared_state]
        if not missing:
            return dict(shared_state)
        own = self.client_private_states.get(name, {}) if name is not None else {}
        return {**shared_state, **{key: own.get(key, self._initial_private_state[key]) for key in missing}}

    # ---- the federation ------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: Union[str, bool, None] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run the federation from round 1, or after the round of `resume_from_checkpoint`.

        Args:
            resume_from_checkpoint: `True` resumes after the newest complete `output_dir/round-{k}/`; a path resumes
                from that checkpoint. Finished rounds are neither redone nor rewritten.
            trial: unused (hyper-parameter search is not supported for federations).
            ignore_keys_for_eval: output keys to ignore when gathering predictions.

        Returns:
            `TrainOutput(global_step=rounds done, training_loss=mean local loss, metrics=last round's scalars)`, with
            `metrics["train_loss"] == training_loss` as in the `Trainer` (the last round's: `last_round_train_loss`).
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}.")
        args = self.args
        # checked here, not in __init__: a Flower node builds a trainer for its own client only and never runs rounds
        if args.federation_mode != "centralized":
            self.server.check_sampling()
        start_time = time.time()
        self.server.reset(self._shared_state())
        self.server.engine_identity = self._run_fingerprint()
        self.client_states = {}
        self.client_private_states = {}
        first_round = 1
        path = self.server.checkpoint_to_resume(resume_from_checkpoint)
        if path is not None:
            first_round = self._load_federation_checkpoint(path) + 1
            start_time -= self.server.elapsed_before_resume()

        self.state.max_steps = args.num_rounds
        self.state.global_step = first_round - 1
        self.state.epoch = None
        self.state.logging_steps, self.state.eval_steps, self.state.save_steps = 1, args.eval_steps, args.save_steps
        self.state.log_history = [scalar_items(record) | {"step": record["round"]} for record in self.history]
        self._track_best_round()  # a resumed run's best round so far
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for callback in self.callback_handler.callbacks:  # a resumed run's progress bar starts at k / N, not 0 / N
            if isinstance(callback, ProgressCallback) and getattr(callback, "training_bar", None) is not None:
                callback.training_bar.update(first_round - 1)
                callback.current_step = first_round - 1
        for round_index in range(first_round, args.num_rounds + 1):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            record = self._run_round(round_index, ignore_keys_for_eval)
            record["wall_time"] = time.time() - start_time
            self.server.add_record(record)
            self.state.global_step = round_index
            # the Trainer's order: on_step_end, then on_log, on_evaluate, on_save
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self.log(loggable_items(record) | (client_curves(record) if args.log_client_scores else {}))
            if self.server.is_evaluation_round(round_index):
                # as in the Trainer: callbacks see the previous best (EarlyStoppingCallback compares with it)
                metrics = {key: value for key, value in scalar_items(record).items() if key.startswith("eval_")}
                self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics)
                self._track_best_round(record)
            stopping = self.control.should_training_stop and round_index < args.num_rounds
            if self.server.is_checkpoint_round(round_index) or (stopping and args.save_every_rounds):
                self._save_federation_checkpoint(round_index)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if stopping:
                logger.warning("A callback stopped the federation after round %d of %d.", round_index, args.num_rounds)
                break
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_round(Path(self.state.best_model_checkpoint))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        training_loss, metrics = run_summary(self.history)
        metrics["train_runtime"] = time.time() - start_time
        return TrainOutput(self.state.global_step, training_loss, metrics)

    def _run_fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must also match to continue this run: the local training settings, the adapter's
        config and every client's data (size, label counts, content hash)."""
        return {
            "local_training": self.args.local_training_identity(),
            "adapter": adapter_fingerprint(self.model),
            "client_data": {name: data_fingerprint(self.clients[name]) for name in sorted(self.clients)},
        }

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients that train in `round_index` (deterministic in the sampling seed and the round)."""
        if self.args.federation_mode == "centralized":
            return [POOLED_CLIENT]
        return self.server.sample(round_index)

    def _run_round(self, round_index: int, ignore_keys_for_eval: Optional[list[str]]) -> dict[str, Any]:
        args = self.args
        round_start = time.time()
        sampled = self.sample_clients(round_index)
        mine = sampled[args.process_index :: args.world_size]
        local_mode = args.federation_mode == "local"
        accumulator = self.server.new_accumulator()
        weights = self.server.client_weights({name: self._client(name).num_examples for name in sampled})
        reports: list[ClientReport] = []
        new_client_states, new_private_states = {}, {}
        for name in mine:
            start_state = self.client_states.get(name, self.global_state) if local_mode else self.global_state
            report, update = self.train_client(name, round_index, start_state)
            reports.append(report)
            if not report.ok:
                continue
            if local_mode:
                new_client_states[name] = self.get_trainable_state()  # exact, unlike start + update
            else:
                accumulator.add(self.server.bound_update(update), weights[name])
                if name in self.client_private_states:
                    new_private_states[name] = self.client_private_states[name]

        if args.world_size > 1:
            reports = gather_object(reports)
            accumulator.weighted_sum = self.accelerator.reduce(accumulator.weighted_sum.to(args.device), "sum").cpu()
            accumulator.total_weight = sum(weights[r.client] for r in reports if r.ok and not local_mode)
            if accumulator.updates is not None:  # robust aggregations sort all updates: their order is moot
                accumulator.updates = [u for part in gather_object([accumulator.updates]) for u in part]
            if local_mode:
                for part in gather_object([new_client_states]):
                    self.client_states.update(part)
            elif self.private_keys:  # every process keeps every client's private tensors (for evaluation)
                for part in gather_object([new_private_states]):
                    self.client_private_states.update(part)
        else:
            self.client_states.update(new_client_states)
        # checks that enough updates are usable, then takes the server step (none in the local-only baseline)
        record = self.server.finish_round(round_index, sampled, reports, None if local_mode else accumulator)
        self.load_trainable_state(self.client_state(None, self.global_state))
        record["train_time"] = time.time() - round_start
        if self.server.is_evaluation_round(round_index):
            eval_start = time.time()
            record.update(self.evaluate_federation(ignore_keys=ignore_keys_for_eval))
            record["eval_time"] = time.time() - eval_start
        record["round_time"] = time.time() - round_start
        return record

    def _pool_training_clients(self) -> Any:
        """All training clients' data in one dataset; for C2A each example keeps its client's descriptor."""
        from datasets import concatenate_datasets

        parts = []
        for name in self.training_clients:
            client = self.clients[name]
            part = client.dataset
            if client.descriptor is not None and "label_distribution" not in part.column_names:
                part = part.add_column("label_distribution", [client.descriptor.tolist()] * len(part))
            if client.client_id is not None and "client_ids" not in part.column_names:
                part = part.add_column("client_ids", [client.client_id] * len(part))
            parts.append(part)
        return concatenate_datasets(parts)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def _save_federation_checkpoint(self, round_index: int) -> None:
        """The server's checkpoint plus what only this engine has: RNG states, per-client states, the local
        optimizer (when it carries over), and the global adapter via `save_pretrained`."""
        args = self.args
        if self.is_world_process_zero():
            tensors: dict[str, TensorDict] = {RNG_FILE: {"torch": torch.get_rng_state()}}
            client_order, private_order = sorted(self.client_states), sorted(self.client_private_states)
            if client_order:
                tensors[CLIENT_STATES_FILE] = indexed_states(self.client_states, client_order)
            if private_order:
                tensors[CLIENT_PRIVATE_FILE] = indexed_states(self.client_private_states, private_order)
            optimizer_meta = None
            if not args.reset_optimizer_each_round and self.optimizer is not None:
                tensors[OPTIMIZER_FILE], optimizer_meta = optimizer_to_tensors(
                    unwrap_optimizer(self.optimizer).state_dict()
                )
            meta = {
                "client_state_order": client_order,
                "client_private_order": private_order,
                "local_optimizer": optimizer_meta,
                "callback_states": export_callback_states(self.callback_handler.callbacks),
                **rng_states_to_json(),
            }
            # the global state is in the model now, so PeftModel.save_pretrained writes the global adapter
            write_extra = self.model.save_pretrained if isinstance(self.model, PeftModel) else None
            keep_round = self.state.best_global_step if args.metric_for_best_model else None
            self.server.save_checkpoint(round_index, tensors, meta, write_extra, keep_round=keep_round)
        self.accelerator.wait_for_everyone()
        self._track_best_round()  # the best round may have a checkpoint now

    def _track_best_round(self, record: Optional[Mapping[str, Any]] = None) -> None:
        """Set the Trainer's `state.best_metric`, `best_global_step` (the best round) and `best_model_checkpoint`
        from the history by `metric_for_best_model` (`best_round.best_evaluation`); `record`, an evaluation just
        made, must hold that metric."""
        metric = self.args.metric_for_best_model
        if metric is None:
            return
        if record is not None:
            check_metric_present(record, metric)
        best = best_evaluation(self.history, metric, bool(self.args.greater_is_better))
        if best is None:
            return
        self.state.best_global_step, self.state.best_metric = best
        folder = checkpoint_dir(self.args.output_dir, best[0])
        self.state.best_model_checkpoint = str(folder) if folder.is_dir() else None

    def _load_best_round(self, path: Path) -> None:
        """`load_best_model_at_end`: the best round's global state (and the clients' own tensors of that round)
        become the model's; the history and the checkpoints stay as they are."""
        checkpoint = self.server.read_checkpoint(path)
        self._restore_states(checkpoint, path)
        self.load_trainable_state(self.client_state(None, self.global_state))
        logger.warning(
            "Loaded the best round (%d, %s = %.4f) from %s.",
            self.state.best_global_step,
            self.args.metric_for_best_model,
            self.state.best_metric,
            path,
        )

    def _restore_states(self, checkpoint: ServerCheckpoint, path: Path) -> None:
        """The model's, the server's and the clients' trainable states from `checkpoint` (already verified)."""
        meta, tensors = checkpoint.meta, checkpoint.tensors
        try:
            load_trainable_state(self.model, checkpoint.global_state, keep=self.private_keys)
        except ValueError as error:
            raise CheckpointError(f"Checkpoint {path} does not fit this model: {error}") from error
        self.server.global_state = dict(checkpoint.global_state)
        self.client_states = unindexed_states(tensors.get(CLIENT_STATES_FILE, {}), meta.get("client_state_order", []))
        self.client_private_states = unindexed_states(
            tensors.get(CLIENT_PRIVATE_FILE, {}), meta.get("client_private_order", [])
        )

    def _load_federation_checkpoint(self, path: Path) -> int:
        """Restore everything from checkpoint `path`; return its round. Raises `CheckpointError` on any mismatch,
        before anything is changed."""
        checkpoint = self.server.read_checkpoint(path)
        meta, tensors = checkpoint.meta, checkpoint.tensors
        carries_optimizer = meta.get("local_optimizer") is not None and not self.args.reset_optimizer_each_round
        needed = [RNG_FILE] + ([CLIENT_STATES_FILE] if meta.get("client_state_order") else [])
        needed += [CLIENT_PRIVATE_FILE] if meta.get("client_private_order") else []
        needed += [OPTIMIZER_FILE] if carries_optimizer else []
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise CheckpointError(f"Checkpoint {path} lacks {missing}: it is incomplete.")
        self._restore_states(checkpoint, path)
        round_index = self.server.restore(checkpoint)
        if carries_optimizer:
            self._local_optimizer(1)
            state = optimizer_from_tensors(tensors[OPTIMIZER_FILE], meta["local_optimizer"])
            unwrap_optimizer(self.optimizer).load_state_dict(state)
        torch.set_rng_state(tensors[RNG_FILE]["torch"])
        rng_states_from_json(meta)
        if self.args.restore_callback_states_from_checkpoint:
            restore_callback_states(self.callback_handler.callbacks, meta.get("callback_states", {}))
        return round_index
