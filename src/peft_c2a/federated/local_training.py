"""A client's part of a round in `FederatedTrainer`: its data loader, its seeded local training with the `Trainer`'s
own machinery, and the FedProx term.

`LocalTraining` is a mixin of `FederatedTrainer` (which provides `clients`, `private_keys`,
`client_private_states`, `client_state`, `descriptor_spec` and the trainable-state helpers); the Flower node runs
the same `train_client`, so local training exists once for both engines.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import set_seed

from .aggregation import non_finite_tensors, state_nbytes
from .clients import DESCRIPTOR_COLUMNS, ClientData, DescriptorCollator
from .server import ClientReport

logger = logging.getLogger("peft_c2a.federated.trainer")  # one logger for everything the trainer says

POOLED_CLIENT = "__pooled__"

TensorDict = dict[str, torch.Tensor]


class LocalTraining(Trainer):
    """Local training of one client at a time on a `Trainer` (a mixin of `FederatedTrainer`)."""

    def client_seed(self, round_index: int, name: str, stream: int = 0) -> int:
        """The seed of `name`'s local training in `round_index`: the same on every process and after resuming
        (`stream=1`: its personalisation fine-tuning before evaluation, a stream of its own)."""
        entropy = [self.args.seed, round_index, zlib.crc32(name.encode())] + ([stream] if stream else [])
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

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

    def _enable_activation_checkpointing(self) -> None:
        """`activation_checkpointing` (or its alias `gradient_checkpointing`) as the Trainer's loop applies it, once:
        activations are recomputed in the backward pass, trading compute for memory; the updates are unchanged."""
        args = self.args
        if not args.activation_checkpointing or getattr(self, "_activation_checkpointing_on", False):
            return
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )
        self._activation_checkpointing_on = True

    def _run_local_training(
        self, name: str, round_index: int, start_state: TensorDict, personalization_steps: int = 0
    ) -> tuple[int, float, int]:
        """Train the model (holding `start_state`) on client `name`'s data for one round; return its example count,
        mean loss and optimizer steps. With `personalization_steps`, make that many steps of plain fine-tuning
        instead (at `learning_rate`, no FedProx term, a seed stream of its own)."""
        args = self.args
        seed = self.client_seed(round_index, name, stream=1 if personalization_steps else 0)
        set_seed(seed)
        client = self._client(name)
        loader = self._client_loader(client, seed, train=True)
        batches_per_epoch = len(loader)
        if batches_per_epoch == 0:
            raise ValueError(f"Client {name!r} has fewer examples than one batch (dataloader_drop_last is on).")
        accumulation = args.gradient_accumulation_steps
        if personalization_steps or args.local_max_steps > 0:
            total_batches = (personalization_steps or args.local_max_steps) * accumulation
        else:
            total_batches = max(1, math.ceil(args.local_epochs * batches_per_epoch))
        total_updates = math.ceil(total_batches / accumulation)

        lr_factor = 1.0 if personalization_steps else args.round_lr_factor(round_index)
        optimizer = self._local_optimizer(total_updates, lr_factor)
        params = self._trainable_parameters()
        fedprox = args.aggregation == "fedprox" and args.proximal_mu > 0 and args.federation_mode == "federated"
        if fedprox and not personalization_steps:
            self._proximal_anchor = [(params[key], start_state[key].to(params[key].device)) for key in start_state]
        self._enable_activation_checkpointing()
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

    def _local_optimizer(self, num_updates: int, lr_factor: float = 1.0) -> torch.optim.Optimizer:
        """A fresh optimizer and schedule per client and round, or the carried-over optimizer with a new schedule;
        its learning rates are the configured ones times `lr_factor` (the round's, `round_lr_scheduler`)."""
        if self.args.reset_optimizer_each_round or self.optimizer is None:
            old = self.optimizer
            self.optimizer = None
            raw = self.create_optimizer()
            # accelerate keeps every prepared optimizer; forget the previous client's so they do not pile up
            self.accelerator._optimizers = [opt for opt in self.accelerator._optimizers if opt is not old]
            self.optimizer = self.accelerator.prepare_optimizer(raw)
        for group in unwrap_optimizer(self.optimizer).param_groups:
            # the schedule below starts from `initial_lr` (a carried-over optimizer already has one)
            base = group.setdefault("federated_base_lr", group["lr"])
            group["lr"] = group["initial_lr"] = base * lr_factor
        self.lr_scheduler = None
        self.create_scheduler(num_training_steps=num_updates, optimizer=unwrap_optimizer(self.optimizer))
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


def _cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of `loader` epoch after epoch (each epoch reshuffled by the loader's own generator)."""
    while True:
        yield from loader


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)
