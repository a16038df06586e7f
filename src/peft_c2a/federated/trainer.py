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
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from accelerate.utils import gather_object
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import EvalPrediction, TrainOutput, set_seed

from .aggregation import UpdateAccumulator, non_finite_tensors, state_nbytes
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
    DESCRIPTOR_COLUMNS,
    ClientData,
    DescriptorCollator,
    build_clients,
    descriptor_spec,
    expected_num_labels,
)
from .metrics import classification_metrics, evaluation_summary, loggable_items, prior_only_accuracy, scalar_items
from .rounds import load_trainable_state, private_parameter_names, trainable_parameters, trainable_state
from .server import ClientReport, FederationServer, ServerBacked

logger = logging.getLogger(__name__)

POOLED_CLIENT = "__pooled__"

TensorDict = dict[str, torch.Tensor]


class FederatedTrainer(ServerBacked, Trainer):
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
        if not args.reset_optimizer_each_round and args.world_size > 1:
            raise ValueError("`reset_optimizer_each_round=False` is supported in a single process only.")
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
        accumulator = UpdateAccumulator(self.global_state)
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
                accumulator.add(update, report.num_examples)
                if name in self.client_private_states:
                    new_private_states[name] = self.client_private_states[name]

        if args.world_size > 1:
            reports = gather_object(reports)
            accumulator.weighted_sum = self.accelerator.reduce(accumulator.weighted_sum.to(args.device), "sum").cpu()
            accumulator.total_weight = sum(r.num_examples for r in reports if r.ok and not local_mode)
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

    # ---- local training ------------------------------------------------------------------------------------------

    def client_seed(self, round_index: int, name: str) -> int:
        """The seed of `name`'s local training in `round_index`: the same on every process and after resuming."""
        sequence = np.random.SeedSequence([self.args.seed, round_index, zlib.crc32(name.encode())])
        return int(sequence.generate_state(1)[0])

    def _client(self, name: str) -> ClientData:
        return self._pooled_client if name == POOLED_CLIENT else self.clients[name]

    def _prepared_dataset(self, client: ClientData, train: bool) -> Any:
        """The client's training or evaluation dataset without the columns the model does not take (cached)."""
        dataset = client.dataset if train else client.eval_dataset
        cached = self._prepared.get((client.name, train))
        if cached is None or cached[0] is not dataset:
            description = f"{client.name} {'training' if train else 'evaluation'}"
            cached = (dataset, self._remove_unused_columns(dataset, description=description))
            self._prepared[(client.name, train)] = cached
        return cached[1]

    def _client_loader(self, client: ClientData, seed: Optional[int], train: bool) -> DataLoader:
        """Batches of `client`'s data, each carrying the client's descriptor (shuffled by `seed` when training)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(
            self._prepared_dataset(client, train),
            batch_size=self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size,
            shuffle=train,
            generator=generator,
            collate_fn=DescriptorCollator(self.data_collator, client.descriptor, client.client_id),
            drop_last=self.args.dataloader_drop_last if train else False,
            num_workers=self.args.dataloader_num_workers,
            # pinning only helps (and only works without a warning) when batches go to an accelerator
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type != "cpu",
        )

    def train_client(
        self, name: str, round_index: int, start_state: Mapping[str, torch.Tensor]
    ) -> tuple[ClientReport, Optional[TensorDict]]:
        """Train client `name` for round `round_index` from `start_state`: one client's whole part of a round.

        Returns its `ClientReport` (status ok / failed / rejected, example count, mean local loss, local steps, bytes
        down and up, error) and its update `local - start` (`None` when training raised). Only `ok` updates
        may be averaged in: a failed client, or one whose update is not finite (`rejected`), is dropped from the
        round, never fatal to the federation. The model is left holding the client's local state.

        `start_state` may lack the client-private tensors (`private_keys`): the client then starts from its own copy,
        the update covers `start_state`'s tensors only, and a usable run keeps the new private tensors on the client
        (`client_private_states`).
        """
        # the local-only and centralised baselines communicate no model state
        communicates = self.args.federation_mode == "federated"
        bytes_down = state_nbytes(start_state) if communicates else 0
        own_start = self.client_state(name, start_state)
        self.load_trainable_state(own_start)
        try:
            stats = self._run_local_training(name, round_index, own_start)
        except Exception as error:  # any failure of one client drops that client, never the federation
            logger.warning("Round %d: client %r failed and is dropped: %r", round_index, name, error)
            self.model.zero_grad(set_to_none=True)
            return ClientReport(name, "failed", bytes_down=bytes_down, error=repr(error)), None
        local_state = self.get_trainable_state()
        update = {key: local_state[key] - start_state[key] for key in start_state}
        report = ClientReport(name, "ok", bytes_down=bytes_down, bytes_up=state_nbytes(update) if communicates else 0)
        report.num_examples, report.train_loss, report.local_steps = stats
        bad = non_finite_tensors(update)
        if bad:
            logger.warning(
                "Round %d: client %r sent a non-finite update (%s ...); rejected.", round_index, name, bad[0]
            )
            report.status, report.error = "rejected", f"non-finite update in {bad[:3]}"
            return report, update
        private = {key: local_state[key] for key in self.private_keys if key not in start_state}
        if private:
            self.client_private_states[name] = private
        return report, update

    def _run_local_training(self, name: str, round_index: int, start_state: TensorDict) -> tuple[int, float, int]:
        """Train the model (holding `start_state`) on client `name`'s data for one round; return its example count,
        mean loss and optimizer steps."""
        args = self.args
        seed = self.client_seed(round_index, name)
        set_seed(seed)
        client = self._client(name)
        loader = self._client_loader(client, seed, train=True)
        batches_per_epoch = len(loader)
        if batches_per_epoch == 0:
            raise ValueError(f"Client {name!r} has fewer examples than one batch (dataloader_drop_last is on).")
        accumulation = args.gradient_accumulation_steps
        if args.local_max_steps > 0:
            total_batches = args.local_max_steps * accumulation
        else:
            total_batches = max(1, math.ceil(args.local_epochs * batches_per_epoch))
        total_updates = math.ceil(total_batches / accumulation)

        optimizer = self._local_optimizer(total_updates)
        params = self._trainable_parameters()
        if args.aggregation == "fedprox" and args.proximal_mu > 0 and args.federation_mode == "federated":
            self._proximal_anchor = [(params[key], start_state[key].to(params[key].device)) for key in start_state]
        model = self.model
        model.train()
        batches = _cycle(loader)
        loss_sum, seen = 0.0, 0
        self.accelerator.gradient_state._set_sync_gradients(True)  # no DDP: every step is a sync step
        try:
            for update in range(total_updates):
                micro = [next(batches) for _ in range(min(accumulation, total_batches - update * accumulation))]
                self.current_gradient_accumulation_steps = len(micro)
                num_items = self._get_num_items_in_batch(micro, args.device)
                step_loss = 0.0
                for inputs in micro:
                    step_loss += float(self.training_step(model, inputs, num_items))
                if args.max_grad_norm and args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if not getattr(optimizer, "step_was_skipped", False):
                    self.lr_scheduler.step()
                model.zero_grad(set_to_none=True)
                loss_sum += step_loss
                seen += 1
        finally:
            self._proximal_anchor = None
        return client.num_examples, loss_sum / max(seen, 1), seen

    def _local_optimizer(self, num_updates: int) -> torch.optim.Optimizer:
        """A fresh optimizer and schedule per client and round, or the carried-over optimizer with a new schedule."""
        if self.args.reset_optimizer_each_round or self.optimizer is None:
            old = self.optimizer
            self.optimizer = None
            raw = self.create_optimizer()
            # accelerate keeps every prepared optimizer; forget the previous client's so they do not pile up
            self.accelerator._optimizers = [opt for opt in self.accelerator._optimizers if opt is not old]
            self.optimizer = self.accelerator.prepare_optimizer(raw)
        self.lr_scheduler = None
        self.create_scheduler(num_training_steps=num_updates, optimizer=_unwrap_optimizer(self.optimizer))
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Any:
        """The Trainer's loss, plus the proximal term `mu / 2 * ||w - w_global||^2` in FedProx local training."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._proximal_anchor is None or not model.training:
            return result
        proximal = sum(((param - anchor) ** 2).sum() for param, anchor in self._proximal_anchor)
        extra = 0.5 * self.args.proximal_mu * proximal
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True) -> Any:
        """Mixed precision (`bf16` / `fp16`) for local training and evaluation.

        The plain Trainer gets autocast from `accelerator.prepare(model)`; clients train the unprepared model (it is
        never wrapped in DDP), so the accelerator's autocast is entered here, around every forward.
        """
        return self.accelerator.autocast()

    def _set_signature_columns_if_needed(self) -> None:
        # The base model's forward does not name the descriptor, so a plain Trainer would drop descriptor columns.
        super()._set_signature_columns_if_needed()
        if self.descriptor_spec is not None:
            self._signature_columns += [name for name in DESCRIPTOR_COLUMNS if name not in self._signature_columns]

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

    # ---- evaluation ----------------------------------------------------------------------------------------------

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
        logits_all, labels_all, loss_sum, count = None, None, 0.0, 0
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
        scores: dict[str, float] = {}
        if count:
            scores["loss"] = loss_sum / count
        if logits_all is not None and labels_all is not None:
            logits_np, labels_np = nested_numpify(logits_all), nested_numpify(labels_all)
            predictions = logits_np.argmax(-1) if logits_np.ndim == labels_np.ndim + 1 else logits_np
            if predictions.shape == labels_np.shape:
                scores.update(classification_metrics(predictions, labels_np))
                if client.label_counts is not None and kind in ("client", "unseen"):
                    scores["prior_only_accuracy"] = prior_only_accuracy(client.label_counts, labels_np)
            if self.compute_metrics is not None:
                extra = self.compute_metrics(EvalPrediction(predictions=logits_np, label_ids=labels_np))
                scores.update({key: float(value) for key, value in extra.items()})
        scores.setdefault("num_examples", count)
        return scores

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """`Trainer.save_model`'s writer, with the arguments saved as JSON instead of a pickled `training_args.bin`
        (so nothing this package writes needs unpickling to read)."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            target = Path(output_dir if output_dir is not None else self.args.output_dir)
            (target / "training_args.bin").unlink(missing_ok=True)
            (target / "training_args.json").write_text(self.args.to_json_string())

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
                    _unwrap_optimizer(self.optimizer).state_dict()
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
            _unwrap_optimizer(self.optimizer).load_state_dict(state)
        torch.set_rng_state(tensors[RNG_FILE]["torch"])
        rng_states_from_json(meta)
        return round_index


def _cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of `loader` epoch after epoch (each epoch reshuffled by the loader's own generator)."""
    while True:
        yield from loader


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)
