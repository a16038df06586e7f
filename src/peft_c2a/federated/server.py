"""`FederationServer`: the server side of a federation, one object for both engines.

It holds what a server owns -- the roster of clients, the global (shared) trainable state, the server optimizer and
the history -- and does what a server does: check the roster, draw each round's clients, screen and count the
clients' reports, aggregate their updates and take the server step, decide which rounds evaluate and checkpoint,
and save and resume checkpoints. `FederatedTrainer` drives it with clients trained in-process (or sharded over
processes); `peft_c2a.flower.FederatedStrategy` drives it with clients on Flower nodes. Only how updates reach it
differs, so with the same clients, settings and seed both engines produce the same global state (tested).

One round, top-down:

    sampled = server.sample(round_index)                           # seeded by the round: same on every engine
    ... each sampled client trains and returns a `ClientReport` (+ its update, summed into an `UpdateAccumulator`)
    record = server.finish_round(round_index, sampled, reports, accumulator)   # enough? aggregate, server step
    ... evaluate when `server.is_evaluation_round(round_index)`, add the scores to `record`
    server.add_record(record)                                      # history.json
    if server.is_checkpoint_round(round_index): server.save_checkpoint(round_index, ...)

A checkpoint holds the server's part (global state, server optimizer, history, the run's identity); an engine adds
its own files through `extra_tensors` / `extra_meta` (the trainer: RNG states, per-client states, the local
optimizer). Resuming reads and verifies everything first (`read_checkpoint`) and changes nothing until `restore`.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .aggregation import (
    FedAvgServer,
    UpdateAccumulator,
    capped_shares,
    clip_to_norm,
    make_server_optimizer,
    non_finite_tensors,
)
from .arguments import FederatedTrainingArguments
from .checkpoint import (
    FEDERATION_STATE_FILE,
    HISTORY_FILE,
    SERVER_STATE_FILE,
    TRAINABLE_STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    remove_stale_temporaries,
    write_checkpoint,
)
from .metrics import write_history
from .reports import ClientReport, round_record
from .rounds import TensorDict, sample_round_clients, screen_update

logger = logging.getLogger(__name__)


@dataclass
class ServerCheckpoint:
    """A checkpoint read and verified against the run, not yet applied (`FederationServer.restore` applies it)."""

    path: Path
    round_index: int
    global_state: TensorDict
    server_optimizer: FedAvgServer
    history: list[dict[str, Any]]
    meta: dict[str, Any]
    tensors: dict[str, TensorDict] = field(repr=False)


class FederationServer:
    """Roster, global state, server optimizer and history of a federation, and the rules of its rounds.

    Args:
        args: the federation's `FederatedTrainingArguments`.
        global_state: the initial shared trainable state (client-private tensors excluded).
        engine: recorded in the checkpoints' identity when set (`"flower"`): a checkpoint resumes on its own engine.
        is_writer: whether this process writes history and checkpoints (process zero of a multi-process run).
        log: where the server's messages go (the Flower strategy passes Flower's logger, so they show in `flwr log`).
    """

    def __init__(
        self,
        args: FederatedTrainingArguments,
        global_state: Mapping[str, torch.Tensor],
        engine: Optional[str] = None,
        is_writer: bool = True,
        log: Optional[logging.Logger] = None,
    ) -> None:
        self.args = args
        self.log = log or logger
        self.engine = engine
        self.is_writer = is_writer
        self.global_state: TensorDict = dict(global_state)
        self.server_optimizer = make_server_optimizer(args)
        self.history: list[dict[str, Any]] = []
        self.training_clients: list[str] = []
        self.unseen_clients: list[str] = []
        # which run the checkpoints this server writes (and may prune) belong to; a resumed run keeps its own
        self.run_id = uuid.uuid4().hex
        # what else a checkpoint must match to continue this run, set by the engine (local training settings, the
        # adapter's config, each client's data): `identity()` adds it
        self.engine_identity: dict[str, Any] = {}

    def reset(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Start a run afresh from `global_state`: a new server optimizer, an empty history."""
        self.global_state = dict(global_state)
        self.server_optimizer = make_server_optimizer(self.args)
        self.history = []
        self.run_id = uuid.uuid4().hex

    # ---- the roster ----------------------------------------------------------------------------------------------

    def set_roster(self, clients: Iterable[str], unseen_clients: Sequence[str], where: str) -> None:
        """Take the federation's clients; those in `unseen_clients` never train.

        Raises `ValueError` when an unseen client is not among `clients` (`where` says where they were looked for) or
        when no client is left to train.
        """
        names = set(clients)
        if not names:
            raise ValueError("The federation has no clients.")
        unknown = sorted(set(unseen_clients) - names)
        if unknown:
            raise ValueError(f"`unseen_clients` names clients {where}: {unknown}.")
        self.unseen_clients = sorted(set(unseen_clients))
        self.training_clients = sorted(names - set(self.unseen_clients))
        if not self.training_clients:
            raise ValueError("Every client is listed in `unseen_clients`: none is left to train.")

    def check_sampling(self) -> None:
        """Raise `ValueError` when `min_clients_per_round` exceeds the clients sampled per round (every round would
        fail)."""
        per_round = self.args.num_sampled_clients(len(self.training_clients))
        if self.args.min_clients_per_round > per_round:
            raise ValueError(
                f"`min_clients_per_round={self.args.min_clients_per_round}` exceeds the {per_round} clients sampled "
                "per round: every round would fail."
            )

    def sample(self, round_index: int) -> list[str]:
        """The training clients drawn for `round_index` (seeded by the round: the same on every engine and resume)."""
        return sample_round_clients(self.training_clients, round_index, self.args)

    # ---- a round -------------------------------------------------------------------------------------------------

    def finish_round(
        self,
        round_index: int,
        sampled: Sequence[str],
        reports: Sequence[ClientReport],
        accumulator: Optional[UpdateAccumulator] = None,
    ) -> dict[str, Any]:
        """Close a round's training: check enough updates are usable, take the server step, return the record.

        `accumulator` holds the example-weighted sum of the usable updates (`None`: the local-only baseline, which
        has no global step). Raises `RuntimeError` before the server step -- the global state and the last
        checkpoint stay as they were -- when fewer than `min_clients_per_round` reports are usable.
        """
        order = {name: index for index, name in enumerate(sampled)}
        reports = sorted(reports, key=lambda report: order.get(report.client, len(order)))
        usable = [report for report in reports if report.ok]
        if len(usable) < min(self.args.min_clients_per_round, len(sampled)):
            problems = {report.client: report.error for report in reports if not report.ok}
            problems.update(dict.fromkeys(sorted(set(sampled) - {report.client for report in reports}), "no reply"))
            raise RuntimeError(
                f"Round {round_index}: only {len(usable)} usable client updates, below `min_clients_per_round="
                f"{self.args.min_clients_per_round}`. Failed or rejected clients: {problems}. The last checkpoint is "
                "intact."
            )
        if accumulator is not None:
            before = self.server_optimizer.state_dict()
            robust = self.args.robust_aggregation
            mean_update = (
                accumulator.mean() if robust == "none" else accumulator.robust_mean(robust, self.args.trim_fraction)
            )
            new_state = self.server_optimizer.step(self.global_state, mean_update)
            bad = non_finite_tensors(new_state)
            if bad:
                self.server_optimizer.load_state_dict(before)
                raise RuntimeError(
                    f"Round {round_index}: the aggregated global state is not finite (in {bad[:3]}); it was not "
                    "applied and the last checkpoint is intact. Lower `server_learning_rate`, or bound the updates "
                    "(`max_client_weight`)."
                )
            self.global_state = new_state
        return round_record(round_index, sampled, reports)

    def new_accumulator(self) -> UpdateAccumulator:
        """An empty accumulator for a round's updates (keeping each one when a robust aggregation needs them)."""
        return UpdateAccumulator(self.global_state, keep_updates=self.args.robust_aggregation != "none")

    def bound_update(self, update: Mapping[str, torch.Tensor]) -> TensorDict:
        """`update` scaled down to `max_update_norm` when it is longer (`clip_to_norm`). Engines call this on every
        usable update before adding it."""
        return clip_to_norm(update, self.args.max_update_norm)

    def client_weights(self, example_counts: Mapping[str, int]) -> dict[str, float]:
        """Each sampled client's weight in the round's mean update: its example count (`client_weighting="examples"`,
        FedAvg) or 1 (`"equal"`), every share then capped at `max_client_weight` (`capped_shares`)."""
        equal = self.args.client_weighting == "equal"
        weights = {name: 1.0 if equal else float(count) for name, count in example_counts.items()}
        cap = self.args.max_client_weight
        return weights if cap is None or not weights else capped_shares(weights, cap)

    def is_evaluation_round(self, round_index: int) -> bool:
        """Whether `round_index` ends with an evaluation: every `eval_every_rounds` from round `eval_delay` on (the
        `Trainer`'s rule, with rounds for steps), and always the last."""
        every = self.args.eval_every_rounds
        scheduled = bool(every and round_index % every == 0) and round_index >= self.args.eval_delay
        return scheduled or round_index == self.args.num_rounds

    def is_checkpoint_round(self, round_index: int) -> bool:
        """Whether `round_index` ends with a checkpoint (every `save_every_rounds`, and the last when saving)."""
        every = self.args.save_every_rounds
        return bool(every) and (round_index % every == 0 or round_index == self.args.num_rounds)

    def add_record(self, record: dict[str, Any]) -> None:
        """Append a finished round to the history (and `output_dir/history.json`)."""
        self.history.append(record)
        if self.is_writer:
            write_history(self.history, self.args.output_dir)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to continue this run: which clients train when, how the server
        aggregates, and what the engine adds (`engine_identity`). Only `num_rounds` may change."""
        args = self.args
        identity = {"engine": self.engine} if self.engine else {}
        server_settings: dict[str, Any] = {
            "server_learning_rate": args.effective_server_learning_rate,
            "client_weighting": args.client_weighting,
            "max_client_weight": args.max_client_weight,
            "max_update_norm": args.max_update_norm,
            "robust_aggregation": args.robust_aggregation,
        }
        if args.robust_aggregation == "trimmed_mean":
            server_settings["trim_fraction"] = args.trim_fraction
        if args.aggregation == "fedprox":
            server_settings["proximal_mu"] = args.proximal_mu
        if args.aggregation in ("fedadam", "fedyogi"):
            server_settings.update(
                server_beta1=args.server_beta1, server_beta2=args.server_beta2, server_tau=args.server_tau
            )
        return identity | {
            "federation_mode": args.federation_mode,
            "aggregation": args.aggregation,
            "training_clients": list(self.training_clients),
            "unseen_clients": list(self.unseen_clients),
            "seed": args.seed,
            "client_sampling_seed": args.effective_client_sampling_seed,
            "clients_per_round": args.num_sampled_clients(len(self.training_clients)),
            "server_settings": server_settings,
            **self.engine_identity,
        }

    def checkpoint_to_resume(self, resume_from_checkpoint: Union[str, bool, None]) -> Optional[Path]:
        """The checkpoint `resume_from_checkpoint` names (`True` / `"true"`: the newest in `output_dir`), or `None`
        for a fresh start.

        Folders an interrupted run left are recovered or removed first (`remove_stale_temporaries`). Raises
        `CheckpointError` when resuming is asked for and there is nothing to resume from, and when a fresh start
        finds another run's checkpoints in `output_dir` (its pruning would delete the new run's checkpoints and a
        later resume would continue the old run) unless `overwrite_output_dir` deletes them.
        """
        output_dir = self.args.output_dir
        if self.is_writer:
            for stale in remove_stale_temporaries(output_dir):
                self.log.warning("Removed %s, a checkpoint left half-written by an interrupted run.", stale)
        if resume_from_checkpoint in (None, False, "", "false", "False"):
            existing = list_checkpoints(output_dir)
            if existing and not self.args.overwrite_output_dir:
                names = ", ".join(path.name for _, path in existing)
                raise CheckpointError(
                    f"{output_dir} holds the checkpoints of another run ({names}). Continue that run with "
                    "`resume_from_checkpoint=True`, or start afresh with `overwrite_output_dir=True`, which deletes "
                    "them (or choose another `output_dir`)."
                )
            if existing and self.is_writer:
                for _, path in existing:
                    shutil.rmtree(path)
                self.log.warning(
                    "Deleted %d checkpoints of an earlier run in %s (overwrite_output_dir).", len(existing), output_dir
                )
            return None
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            path = latest_checkpoint(self.args.output_dir)
            if path is None:
                raise CheckpointError(f"No complete federated checkpoint (round-*/) found in {self.args.output_dir}.")
            return path
        return Path(str(resume_from_checkpoint))

    def save_checkpoint(
        self,
        round_index: int,
        extra_tensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
        extra_meta: Optional[Mapping[str, Any]] = None,
        write_extra: Optional[Callable[[Path], None]] = None,
        keep_round: Optional[int] = None,
    ) -> Path:
        """Write `output_dir/round-{round_index}/` (atomic, hashed) and prune old ones to `save_total_limit`.

        Args:
            round_index: the round just finished.
            extra_tensors: the engine's own safetensors files (name -> tensors).
            extra_meta: the engine's own entries of `federation_state.json`.
            write_extra: adds files to the folder before it is sealed (`PeftModel.save_pretrained`).
            keep_round: a round whose checkpoint pruning must keep (the best one).
        """
        args = self.args
        tensors = {TRAINABLE_STATE_FILE: self.global_state, SERVER_STATE_FILE: self.server_optimizer.state_dict()}
        tensors.update(extra_tensors or {})
        meta = {
            "round": round_index,
            "num_rounds": args.num_rounds,
            "run_id": self.run_id,
            **self.identity(),
            **(extra_meta or {}),
        }
        documents = {FEDERATION_STATE_FILE: meta, HISTORY_FILE: self.history}
        path = write_checkpoint(args.output_dir, round_index, tensors, documents, write_extra)
        # only this run's checkpoints, up to this round: a run resumed from an earlier round keeps its later ones
        # until it rewrites them
        prune_checkpoints(
            args.output_dir, args.save_total_limit, run_id=self.run_id, up_to_round=round_index, keep_round=keep_round
        )
        self.log.info("Saved the round-%d checkpoint to %s.", round_index, path)
        return path

    def read_checkpoint(self, path: Union[str, Path]) -> ServerCheckpoint:
        """Read and verify checkpoint `path` against this run; apply nothing.

        Raises `CheckpointError` if it is corrupt or incomplete, comes from a run with other clients, seeds, engine
        or aggregation, lies beyond `num_rounds`, holds a global state that does not fit the current one, or an
        unusable server optimizer state.
        """
        path = Path(path)
        tensors, documents = read_checkpoint(path)
        try:
            meta, history = documents[FEDERATION_STATE_FILE], documents[HISTORY_FILE]
            state = tensors[TRAINABLE_STATE_FILE]
        except KeyError as error:
            raise CheckpointError(
                f"Checkpoint {path} lacks {error.args[0]}: it is not a federated checkpoint."
            ) from error
        for key, value in self.identity().items():
            if key not in meta and key in UNRECORDED_BEFORE_RUN_IDS:
                self.log.warning(
                    "Checkpoint %s does not record %s (an older version wrote it); not compared.", path, key
                )
                continue
            difference = _first_difference(key, meta.get(key), value)
            if difference is not None:
                field_name, written, current = difference
                fit = " does not fit this model: it" if key == "adapter" else ""
                raise CheckpointError(
                    f"Checkpoint {path}{fit} was written with {field_name}={written!r}, but this run has {current!r}."
                )
        round_index = int(meta["round"])
        if round_index > self.args.num_rounds:
            raise CheckpointError(
                f"Checkpoint {path} is at round {round_index}, beyond `num_rounds={self.args.num_rounds}`."
            )
        reason = screen_update(state, self.global_state)
        if reason is not None:
            raise CheckpointError(f"Checkpoint {path} does not fit this model: {reason}.")
        server_optimizer = make_server_optimizer(self.args)
        try:
            server_optimizer.load_state_dict(tensors.get(SERVER_STATE_FILE, {}))
            server_optimizer.check_fits(state)
        except ValueError as error:
            raise CheckpointError(f"Checkpoint {path} has an unusable server optimizer state: {error}") from error
        return ServerCheckpoint(
            path=path,
            round_index=round_index,
            global_state={key: value.clone() for key, value in state.items()},
            server_optimizer=server_optimizer,
            history=[record for record in history if record["round"] <= round_index],
            meta=meta,
            tensors=tensors,
        )

    def restore(self, checkpoint: ServerCheckpoint) -> int:
        """Apply a checkpoint from `read_checkpoint`; return the round it ends."""
        self.global_state = checkpoint.global_state
        self.server_optimizer = checkpoint.server_optimizer
        self.history = list(checkpoint.history)
        self.run_id = checkpoint.meta.get("run_id") or self.run_id
        # a warning, not info: a resume changes what the run does, and scripts commonly log warnings only
        self.log.warning("Resuming the federation after round %d from %s.", checkpoint.round_index, checkpoint.path)
        return checkpoint.round_index

    def elapsed_before_resume(self) -> float:
        """Wall time the restored history had already spent (0 on a fresh start): wall time counts from the start
        of the original run."""
        return float(self.history[-1].get("wall_time", 0.0)) if self.history else 0.0


class ServerBacked:
    """The server's state, readable on the engine that drives it (`FederatedTrainer`, `FederatedStrategy`): both
    hold their `FederationServer` as `self.server`."""

    server: FederationServer

    @property
    def training_clients(self) -> list[str]:
        """The clients that train, sorted."""
        return self.server.training_clients

    @property
    def unseen_clients(self) -> list[str]:
        """The clients that never train, sorted; evaluated with their own descriptors."""
        return self.server.unseen_clients

    @property
    def global_state(self) -> TensorDict:
        """The shared trainable state (client-private tensors excluded)."""
        return self.server.global_state

    @global_state.setter
    def global_state(self, state: TensorDict) -> None:
        self.server.global_state = state

    @property
    def server_optimizer(self) -> FedAvgServer:
        return self.server.server_optimizer

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished round (also in `output_dir/history.json`)."""
        return self.server.history


# identity entries that checkpoints written before run ids were recorded lack; such checkpoints still resume
UNRECORDED_BEFORE_RUN_IDS = ("server_settings", "local_training", "adapter", "client_data", "client_examples")


def _first_difference(name: str, written: Any, current: Any) -> Optional[tuple[str, Any, Any]]:
    """The first field (dotted into dicts) where a checkpoint's record and the current run differ, or `None`."""
    if written == current:
        return None
    if isinstance(written, dict) and isinstance(current, dict):
        for key in sorted(set(written) | set(current), key=str):
            inner = _first_difference(f"{name}.{key}", written.get(key), current.get(key))
            if inner is not None:
                return inner
    return name, written, current
