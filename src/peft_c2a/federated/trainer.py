"""`FederatedTrainer`: a `transformers.Trainer` that runs a federation of clients instead of one training run.

One round: sample clients (seeded by the round), and for each sampled client load the global trainable state,
train locally with the Trainer's own machinery (`training_step`, `compute_loss`, optimizer and scheduler factories,
gradient accumulation, mixed precision through accelerate), and return `local - global` with the client's example
count; the server averages the updates by example count and applies them (FedAvg / FedProx / FedAdam / FedYogi);
then evaluate, log and checkpoint.

Design choices worth knowing:
- *Clients, not batches, are distributed.* Under `accelerate launch` or `torchrun` every process trains its share
  of the round's clients on its own (the model is never wrapped in DDP); the example-weighted sums of their
  updates are all-reduced once per round. Each client's local training is seeded from `(seed, round, client)`, so
  the result is the same with any number of processes and after resuming.
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
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from accelerate.utils import gather_object
from peft import PeftModel
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import EvalPrediction, TrainOutput

from .arguments import FederatedTrainingArguments
from .checkpoint import (
    CLIENT_PRIVATE_FILE,
    CLIENT_STATES_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    CheckpointError,
    indexed_states,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_states_from_json,
    rng_states_to_json,
    unindexed_states,
)
from .clients import (
    ClientData,
    build_clients,
    data_fingerprint,
    descriptor_spec,
    expected_num_labels,
)
from .evaluation import FederatedEvaluation
from .local_training import POOLED_CLIENT, LocalTraining, unwrap_optimizer
from .metrics import loggable_items, scalar_items
from .model_card import federated_model_card
from .rounds import (
    adapter_fingerprint,
    load_trainable_state,
    private_parameter_names,
    trainable_parameters,
    trainable_state,
)
from .server import ClientReport, FederationServer, ServerBacked

logger = logging.getLogger(__name__)

# where `push_to_hub` stages the files it uploads (the leading underscore keeps the Trainer's own pushes off it)
SHAREABLE_DIR = "_shareable"


TensorDict = dict[str, torch.Tensor]


class FederatedTrainer(ServerBacked, FederatedEvaluation, LocalTraining, Trainer):
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
        self.args: FederatedTrainingArguments
        # Local losses are per-batch means: most models ignore `num_items_in_batch` even though their forward takes
        # `**kwargs`, so let `training_step` divide by the accumulation steps (transformers #47688).
        self.model_accepts_loss_kwargs = False
        self.descriptor_spec = descriptor_spec(self.model)
        self.num_labels = expected_num_labels(self.model, self.descriptor_spec)
        self.clients: dict[str, ClientData] = build_clients(
            client_datasets, client_eval_datasets, self.descriptor_spec, self.num_labels
        )
        # the server side of the federation: roster, global state, server optimizer, history, checkpoints
        self.server = FederationServer(args, {}, is_writer=self.is_world_process_zero())
        self.server.set_roster(self.clients, list(unseen_clients or []), where="missing from `client_datasets`")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            raise ValueError(
                f"Launched as {launched} processes (WORLD_SIZE={launched}), but the arguments see one: every process "
                "would run the whole federation into the same output_dir. Build the arguments inside the launched "
                "script as FederatedTrainingArguments (on a machine without GPUs it sets use_cpu=True itself), or pass "
                "`--use_cpu`."
            )
        if not args.reset_optimizer_each_round and args.world_size > 1:
            raise ValueError("`reset_optimizer_each_round=False` is supported in a single process only.")
        if args.robust_aggregation != "none" and args.world_size > 1:
            raise ValueError("`robust_aggregation` is supported in a single process (or on Flower) only.")
        if args.federation_mode == "centralized":
            self._pooled_client = ClientData(POOLED_CLIENT, self._pool_training_clients())
        # datasets with the model's unused columns removed, made once per dataset instead of every round
        self._prepared: dict[tuple[str, bool], tuple[Any, Any]] = {}
        self.client_states: dict[str, TensorDict] = {}
        # C2A's client-id embedding: each federated client keeps its own copy (`client_state`)
        self.private_keys = private_parameter_names(model) if args.federation_mode == "federated" else frozenset()
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
            `TrainOutput(global_step=rounds done, training_loss=mean local loss, metrics=last round's scalars)`.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}.")
        args = self.args
        # checked here, not in __init__: a Flower node builds a trainer for its own client only and never runs rounds
        if args.federation_mode != "centralized":
            self.server.check_sampling()
        start_time = time.time()
        self.server.reset({k: v for k, v in self.get_trainable_state().items() if k not in self.private_keys})
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
        self.state.log_history = [scalar_items(record) | {"step": record["round"]} for record in self.history]
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for callback in self.callback_handler.callbacks:  # a resumed run's progress bar starts at k / N, not 0 / N
            if isinstance(callback, ProgressCallback) and getattr(callback, "training_bar", None) is not None:
                callback.training_bar.update(first_round - 1)
                callback.current_step = first_round - 1
        for round_index in range(first_round, args.num_rounds + 1):
            record = self._run_round(round_index, ignore_keys_for_eval)
            record["wall_time"] = time.time() - start_time
            self.server.add_record(record)
            self.state.global_step = round_index
            self.log(loggable_items(record))
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.server.is_checkpoint_round(round_index):
                self._save_federation_checkpoint(round_index)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        losses = [record["train_loss"] for record in self.history if math.isfinite(record.get("train_loss", math.nan))]
        metrics = scalar_items(self.history[-1]) if self.history else {}
        metrics["train_runtime"] = time.time() - start_time
        return TrainOutput(self.state.global_step, float(np.mean(losses)) if losses else math.nan, metrics)

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

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, uploading only what is meant to be shared: the final (global) adapter, the
        tokenizer, `training_args.json` and the model card.

        The plain Trainer uploads the whole `output_dir`, which here holds every `round-*/` checkpoint (RNG states,
        client lists, per-client histories and states) and the example's label heatmap: each client's label
        distribution, which C2A keeps on the client. This one stages the shareable files in
        `output_dir/_shareable/` and uploads that folder.
        """
        original = self.args.output_dir
        kwargs.setdefault("model_name", Path(original).name if self.args.hub_model_id is None else None)
        if kwargs["model_name"] is None:
            kwargs.pop("model_name")
        staging = Path(original) / SHAREABLE_DIR
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self.args.output_dir = original

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """`Trainer.save_model`'s writer, with the arguments saved as JSON instead of a pickled `training_args.bin`
        (so nothing this package writes needs unpickling to read) and the federation's model card."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            target = Path(output_dir if output_dir is not None else self.args.output_dir)
            (target / "training_args.bin").unlink(missing_ok=True)
            (target / "training_args.json").write_text(self.args.to_json_string())
            self.create_model_card(output_dir=str(target))

    def create_model_card(self, *args: Any, output_dir: Optional[str] = None, **kwargs: Any) -> None:
        """Write `README.md`: the federated adapter's card (`model_card.federated_model_card`: tags, how to load
        it with a descriptor, the federation's settings and final scores over clients) instead of the Trainer's."""
        if not self.is_world_process_zero():
            return
        card = federated_model_card(self.model, self.args, self.history, len(self.clients))
        (Path(output_dir or self.args.output_dir) / "README.md").write_text(card)

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
                **rng_states_to_json(),
            }
            # the global state is in the model now, so PeftModel.save_pretrained writes the global adapter
            write_extra = self.model.save_pretrained if isinstance(self.model, PeftModel) else None
            self.server.save_checkpoint(round_index, tensors, meta, write_extra)
        self.accelerator.wait_for_everyone()

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
        try:
            load_trainable_state(self.model, checkpoint.global_state, keep=self.private_keys)
        except ValueError as error:
            raise CheckpointError(f"Checkpoint {path} does not fit this model: {error}") from error
        round_index = self.server.restore(checkpoint)
        self.client_states = unindexed_states(tensors.get(CLIENT_STATES_FILE, {}), meta.get("client_state_order", []))
        self.client_private_states = unindexed_states(
            tensors.get(CLIENT_PRIVATE_FILE, {}), meta.get("client_private_order", [])
        )
        if carries_optimizer:
            self._local_optimizer(1)
            state = optimizer_from_tensors(tensors[OPTIMIZER_FILE], meta["local_optimizer"])
            unwrap_optimizer(self.optimizer).load_state_dict(state)
        torch.set_rng_state(tensors[RNG_FILE]["torch"])
        rng_states_from_json(meta)
        return round_index
