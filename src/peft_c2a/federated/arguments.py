"""`FederatedTrainingArguments`: the `TrainingArguments` of a federation.

Every `TrainingArguments` field keeps its meaning for *local* training on one client (learning rate, batch size,
gradient accumulation, mixed precision, optimizer, scheduler, gradient clipping ...). The fields added here describe
the federation around it: how many rounds, which clients take part in each round, how their updates are combined,
and when to evaluate and checkpoint. `num_train_epochs` / `max_steps` are not used: a client trains for
`local_epochs` (or `local_max_steps`) in every round it is sampled.

The `Trainer`'s own loop fields are mapped onto the federation where they have a meaning (a *step* is a round):
`eval_strategy` / `eval_steps` and `save_strategy` / `save_steps` are derived from `eval_every_rounds` and
`save_every_rounds` (so `load_best_model_at_end`, `metric_for_best_model` and `EarlyStoppingCallback` work across
rounds), `save_strategy="no"` means `save_every_rounds=0`, and values that contradict the rounds raise. Fields with
no meaning in a federation (`num_train_epochs`, `max_steps`, `eval_on_start`, ...) are reported by one warning.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

logger = logging.getLogger(__name__)

AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "fedyogi")
FEDERATION_MODES = ("federated", "local", "centralized")
WEIGHTINGS = ("examples", "equal")
ROBUST_AGGREGATIONS = ("none", "median", "trimmed_mean")
ROUND_LR_SCHEDULERS = ("constant", "linear", "cosine")
_DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}
# where `load_best_model_at_end` looks when `metric_for_best_model` is not set (the Trainer's "loss" does not exist
# here: a federation has a loss per client); the clients' mean loss on their own test splits exists for every method
DEFAULT_METRIC_FOR_BEST_MODEL = "personalized_mean_loss"
# `TrainingArguments` fields of the Trainer's own loop that a federation does not use: (default, what to use instead)
IGNORED_LOOP_FIELDS: dict[str, tuple[Any, str]] = {
    "num_train_epochs": (3.0, "`num_rounds` and `local_epochs`"),
    "max_steps": (-1, "`num_rounds` and `local_max_steps`"),
    "eval_on_start": (False, "`trainer.evaluate()` before `train()`"),
    "auto_find_batch_size": (False, "`per_device_train_batch_size`"),
    "logging_first_step": (False, "nothing: every round is logged"),
}


@dataclass
class FederatedTrainingArguments(TrainingArguments):
    """Arguments of `FederatedTrainer`: `TrainingArguments` for local training plus the federation's own settings.

    All fields are settable from the command line with `transformers.HfArgumentParser`.

    Args:
        num_rounds (`int`, defaults to 10):
            Number of federated rounds. In each round the sampled clients train locally from the current global
            state and the server aggregates their updates.
        clients_per_round (`int`, *optional*):
            How many clients are sampled in each round. Takes precedence over `client_fraction`.
        client_fraction (`float`, defaults to 1.0):
            Fraction of the training clients sampled in each round (rounded up, at least one) when
            `clients_per_round` is not set.
        local_epochs (`float`, defaults to 1.0):
            Passes over its own data that a sampled client makes in a round. Fractions are allowed (0.5 = half the
            client's batches).
        local_max_steps (`int`, defaults to -1):
            If positive, every sampled client makes exactly this many optimizer steps per round (cycling through its
            data as needed) and `local_epochs` is ignored.
        aggregation (`str`, defaults to `"fedavg"`):
            How updates are combined: `"fedavg"` (example-weighted mean of the client updates), `"fedprox"` (FedAvg
            with a proximal term `proximal_mu / 2 * ||w - w_global||^2` added to every local loss), `"fedadam"` or
            `"fedyogi"` (the example-weighted mean update is the pseudo-gradient of a server-side Adam / Yogi step,
            Reddi et al. 2021).
        proximal_mu (`float`, defaults to 0.01):
            Strength of FedProx's proximal term. Used only with `aggregation="fedprox"`.
        server_learning_rate (`float`, *optional*):
            Server step size. Defaults to 1.0 for FedAvg/FedProx (the plain mean update) and 1e-2 for FedAdam/FedYogi.
        server_beta1 (`float`, defaults to 0.9):
            First-moment decay of the FedAdam/FedYogi server optimizer.
        server_beta2 (`float`, defaults to 0.99):
            Second-moment decay of the FedAdam/FedYogi server optimizer.
        server_tau (`float`, defaults to 1e-3):
            Adaptivity (epsilon) of the FedAdam/FedYogi server optimizer.
        min_clients_per_round (`int`, defaults to 1):
            A round needs at least this many usable client updates. Clients whose local training raises, or whose
            update is not finite, are dropped from the round; if fewer than this remain, training stops with an error
            (the last checkpoint stays intact).
        eval_every_rounds (`int`, defaults to 1):
            Evaluate (global, personalised and unseen clients) every this many rounds, and always after the last
            round. 0 evaluates only after the last round.
        eval_delay (`float`, defaults to 0):
            The `Trainer`'s field, counted in rounds (a step of a federation is a round): no evaluation before round
            `eval_delay`; the last round is always evaluated. With `eval_every_rounds=1` and `eval_delay=N - k + 1`
            only the last k of N rounds are evaluated, which is all a criterion over the last rounds needs. Must be
            a whole number of rounds.
        save_every_rounds (`int`, defaults to 1):
            Write a checkpoint `output_dir/round-{k}/` every this many rounds, and always after the last round.
            0 disables checkpoints. `save_total_limit` keeps only the newest ones.
        reset_optimizer_each_round (`bool`, defaults to `True`):
            Build a fresh local optimizer (and learning-rate schedule) for every client in every round, as federated
            clients do. `False` keeps one optimizer whose moment estimates carry over from client to client and round
            to round (the plain `Trainer`'s behaviour when `train()` is called repeatedly); it is supported in a
            single process only.
        federation_mode (`str`, defaults to `"federated"`):
            `"federated"` aggregates updates as set by `aggregation`. `"local"` is the local-only baseline: every
            client keeps and trains its own copy of the trainable state and nothing is aggregated (the
            personalisation reference). `"centralized"` pools all training clients' data into one client trained
            every round (the upper bound); C2A examples keep their own client's descriptor.
        client_sampling_seed (`int`, *optional*):
            Seed of the per-round client sampling. Defaults to `seed`. Local training is reseeded from `seed`, the
            round and the client, so results do not depend on the process that trains a client or on resumption.
        client_weighting (`str`, defaults to `"examples"`):
            Weight of a client's update in the round's mean: `"examples"` (its number of training examples, FedAvg)
            or `"equal"` (every usable update counts the same).
        overwrite_output_dir (`bool`, defaults to `False`):
            Start a fresh run in an `output_dir` that holds another run's `round-*` checkpoints by deleting them first.
            Without it such a start raises: resume the old run (`resume_from_checkpoint=True`) or choose this.
        max_client_weight (`float`, *optional*):
            A cap on any one client's share of a round's weights, as a fraction of the sampled clients' total (in
            `(0, 1]`; the excess is spread over the others in proportion to their weights). Bounds what a client
            with a huge (or a falsely announced) example count can do to the global state.
        max_update_norm (`float`, *optional*):
            Clip every client update to this L2 norm (over all its tensors) before it is averaged: one client can
            move the global state by at most its weight times this.
        robust_aggregation (`str`, defaults to `"none"`):
            `"median"` (coordinate-wise median) or `"trimmed_mean"` (coordinate-wise mean without the `trim_fraction`
            largest and smallest values) of the usable updates instead of their weighted mean; both ignore the
            example counts and bound what a minority of poisoned updates can do. Under several processes every
            update is gathered (not only their sum).
        trim_fraction (`float`, defaults to 0.2):
            Share of updates dropped at each end per coordinate by `"trimmed_mean"`, in `[0, 0.5)`.
        round_lr_scheduler (`str`, defaults to `"constant"`):
            How the local learning rate decays across rounds: `"constant"`, `"linear"` (round `t` of `T` trains at
            `learning_rate * (1 - (t - 1) / T)`) or `"cosine"` (`learning_rate * (1 + cos(pi (t - 1) / T)) / 2`). Within
            a round `lr_scheduler_type` still shapes the client's steps. A constant rate leaves the global model
            swinging from round to round under skewed clients; a decaying one lets it settle.
        personalization_steps (`int`, defaults to 0):
            Before a client's personalised evaluation, fine-tune the model on that client's own training data for
            this many local steps (from the state it is evaluated with; no FedProx term), evaluate, and restore the
            state: FedAvg-FT, the usual personalised-FL reference (C2A-FT for a C2A model). 0 evaluates as it is.
        eval_logit_adjustment (`float`, defaults to 0.0):
            At personalised evaluation, add `tau * log(p + 0.01)` (centred over the classes) of the client's own
            training label distribution `p` to the model's class scores before predicting: the free post-hoc
            personalisation of a global classifier. Predictions and `compute_metrics` see the adjusted scores, the
            loss is the model's own. 0 turns it off.
        log_client_scores (`bool`, defaults to `False`):
            Also give the `report_to` integrations each client's accuracy and loss per evaluation and its training
            loss per round (a curve per client, `reports.client_curves`). Off by default: with a remote integration
            (W&B, ...) that per-client history would leave the machine; `history.json` always holds it locally.
    """

    num_rounds: int = field(default=10, metadata={"help": "Number of federated rounds."})
    clients_per_round: Optional[int] = field(
        default=None, metadata={"help": "Clients sampled per round (takes precedence over client_fraction)."}
    )
    client_fraction: float = field(default=1.0, metadata={"help": "Fraction of training clients sampled per round."})
    local_epochs: float = field(default=1.0, metadata={"help": "Local epochs of a sampled client in one round."})
    local_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: local optimizer steps per round (overrides local_epochs)."}
    )
    aggregation: str = field(default="fedavg", metadata={"help": "Server aggregation.", "choices": list(AGGREGATIONS)})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal term strength."})
    server_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Server step size (default 1.0 for fedavg/fedprox, 1e-2 for fedadam/fedyogi)."}
    )
    server_beta1: float = field(default=0.9, metadata={"help": "FedAdam/FedYogi first-moment decay."})
    server_beta2: float = field(default=0.99, metadata={"help": "FedAdam/FedYogi second-moment decay."})
    server_tau: float = field(default=1e-3, metadata={"help": "FedAdam/FedYogi adaptivity (epsilon)."})
    min_clients_per_round: int = field(default=1, metadata={"help": "Minimum usable client updates per round."})
    eval_every_rounds: int = field(default=1, metadata={"help": "Evaluate every k rounds (0: only at the end)."})
    save_every_rounds: int = field(default=1, metadata={"help": "Checkpoint every k rounds (0: never)."})
    reset_optimizer_each_round: bool = field(
        default=True, metadata={"help": "Fresh local optimizer for every client in every round."}
    )
    federation_mode: str = field(
        default="federated",
        metadata={"help": "federated, local (baseline) or centralized (baseline).", "choices": list(FEDERATION_MODES)},
    )
    client_sampling_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of the client sampling (defaults to seed)."}
    )

    client_weighting: str = field(
        default="examples",
        metadata={"help": "Weight of a client's update: its example count, or equal.", "choices": list(WEIGHTINGS)},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete another run's round checkpoints in output_dir before a fresh start (else it raises)."
        },
    )
    max_client_weight: Optional[float] = field(
        default=None, metadata={"help": "Cap on one client's share of a round's weights (a fraction in (0, 1])."}
    )

    max_update_norm: Optional[float] = field(
        default=None, metadata={"help": "Clip every client update to this L2 norm before averaging."}
    )
    robust_aggregation: str = field(
        default="none",
        metadata={
            "help": "Coordinate-wise median or trimmed mean of the updates.",
            "choices": list(ROBUST_AGGREGATIONS),
        },
    )
    trim_fraction: float = field(default=0.2, metadata={"help": "Share trimmed at each end by trimmed_mean."})
    round_lr_scheduler: str = field(
        default="constant",
        metadata={"help": "Decay of the local lr across rounds.", "choices": list(ROUND_LR_SCHEDULERS)},
    )
    personalization_steps: int = field(
        default=0, metadata={"help": "Local fine-tuning steps before each personalised evaluation (FedAvg-FT)."}
    )
    eval_logit_adjustment: float = field(
        default=0.0, metadata={"help": "tau of the client-prior logit adjustment at personalised evaluation."}
    )
    log_client_scores: bool = field(
        default=False, metadata={"help": "Log per-client curves to report_to integrations (they leave the machine)."}
    )

    def __post_init__(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            # `torchrun` / `accelerate launch` on a machine without an accelerator: TrainingArguments only sets up
            # the process group with `use_cpu`, so without it every rank would run the whole federation alone
            self.use_cpu = True
        self._map_loop_fields_to_rounds()
        super().__post_init__()
        self.aggregation = self.aggregation.lower()
        self.federation_mode = self.federation_mode.lower()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        if self.federation_mode not in FEDERATION_MODES:
            raise ValueError(f"`federation_mode` must be one of {FEDERATION_MODES}, got {self.federation_mode!r}.")
        if self.num_rounds < 1:
            raise ValueError(f"`num_rounds` must be >= 1, got {self.num_rounds}.")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"`clients_per_round` must be >= 1, got {self.clients_per_round}.")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"`client_fraction` must lie in (0, 1], got {self.client_fraction}.")
        if self.local_max_steps <= 0 and not self.local_epochs > 0:
            raise ValueError(f"`local_epochs` must be > 0 when `local_max_steps` is not set, got {self.local_epochs}.")
        if self.min_clients_per_round < 1:
            raise ValueError(f"`min_clients_per_round` must be >= 1, got {self.min_clients_per_round}.")
        if self.eval_every_rounds < 0 or self.save_every_rounds < 0:
            raise ValueError("`eval_every_rounds` and `save_every_rounds` must be >= 0.")
        if not (math.isfinite(self.eval_delay) and self.eval_delay >= 0 and float(self.eval_delay).is_integer()):
            raise ValueError(f"`eval_delay` counts rounds: a whole number >= 0, got {self.eval_delay}.")
        if self.aggregation == "fedprox" and self.proximal_mu < 0:
            raise ValueError(f"`proximal_mu` must be >= 0, got {self.proximal_mu}.")
        if self.server_learning_rate is not None and not self.server_learning_rate > 0:
            raise ValueError(f"`server_learning_rate` must be > 0, got {self.server_learning_rate}.")
        if not (0.0 <= self.server_beta1 < 1.0 and 0.0 <= self.server_beta2 < 1.0 and self.server_tau > 0):
            raise ValueError("Server optimizer needs 0 <= server_beta1, server_beta2 < 1 and server_tau > 0.")
        # a non-finite setting would turn the global state into NaN / inf at the first round, and be checkpointed
        for name in ("learning_rate", "server_learning_rate", "server_tau", "proximal_mu", "local_epochs"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite, got {value}.")
        if self.client_weighting not in WEIGHTINGS:
            raise ValueError(f"`client_weighting` must be one of {WEIGHTINGS}, got {self.client_weighting!r}.")
        if self.max_client_weight is not None and not 0.0 < self.max_client_weight <= 1.0:
            raise ValueError(f"`max_client_weight` must lie in (0, 1], got {self.max_client_weight}.")
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError(f"`max_update_norm` must be a finite number > 0, got {self.max_update_norm}.")
        if self.robust_aggregation not in ROBUST_AGGREGATIONS:
            raise ValueError(
                f"`robust_aggregation` must be one of {ROBUST_AGGREGATIONS}, got {self.robust_aggregation!r}."
            )
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"`trim_fraction` must lie in [0, 0.5), got {self.trim_fraction}.")
        if self.round_lr_scheduler not in ROUND_LR_SCHEDULERS:
            raise ValueError(
                f"`round_lr_scheduler` must be one of {ROUND_LR_SCHEDULERS}, got {self.round_lr_scheduler!r}."
            )
        if self.personalization_steps < 0:
            raise ValueError(f"`personalization_steps` must be >= 0, got {self.personalization_steps}.")
        if self.personalization_steps and not self.reset_optimizer_each_round:
            raise ValueError(
                "`personalization_steps` fine-tunes with a fresh optimizer: keep reset_optimizer_each_round."
            )
        if not (math.isfinite(self.eval_logit_adjustment) and self.eval_logit_adjustment >= 0):
            raise ValueError(f"`eval_logit_adjustment` must be a finite number >= 0, got {self.eval_logit_adjustment}.")

    def _map_loop_fields_to_rounds(self) -> None:
        """Express the federation's schedule in the Trainer's step fields (a step is a round), refuse values that
        contradict it, and warn once about the loop fields a federation ignores. Runs before `TrainingArguments`'
        own checks, which then hold for rounds (e.g. `load_best_model_at_end` needs checkpoint rounds to be
        evaluation rounds)."""
        ignored = [
            f"`{name}` (use {instead})"
            for name, (default, instead) in IGNORED_LOOP_FIELDS.items()
            if getattr(self, name) != default
        ]
        hub_strategy = str(getattr(self.hub_strategy, "value", self.hub_strategy))
        if self.push_to_hub and hub_strategy in ("checkpoint", "all_checkpoints"):
            ignored.append(
                f"`hub_strategy={hub_strategy!r}` (round checkpoints hold per-client state and are never pushed; "
                "`save_model()` / `push_to_hub()` push the global adapter)"
            )
        if ignored:
            logger.warning("A federation ignores these TrainingArguments: %s.", "; ".join(ignored))

        eval_strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        save_strategy = str(getattr(self.save_strategy, "value", self.save_strategy))
        for name, value in (("eval_strategy", eval_strategy), ("save_strategy", save_strategy)):
            if value in ("epoch", "best"):
                every = "eval_every_rounds" if name == "eval_strategy" else "save_every_rounds"
                raise ValueError(
                    f"`{name}={value!r}` has no meaning in a federation, which runs rounds: use `{every}` (and "
                    "`load_best_model_at_end` with `metric_for_best_model` to keep the best round)."
                )
        if save_strategy == "no":
            if self.save_every_rounds not in (0, 1):
                raise ValueError(
                    f"`save_strategy='no'` contradicts `save_every_rounds={self.save_every_rounds}`: set one of them."
                )
            self.save_every_rounds = 0
        eval_rounds = self.eval_every_rounds or self.num_rounds
        if self.eval_steps is not None and self.eval_steps != eval_rounds:
            raise ValueError(
                f"`eval_steps={self.eval_steps}` contradicts the federation's evaluation every {eval_rounds} rounds: "
                "set `eval_every_rounds` instead (a step of a federation is a round)."
            )
        if self.save_every_rounds and self.save_steps not in (500, self.save_every_rounds):  # 500: the field's default
            raise ValueError(
                f"`save_steps={self.save_steps}` contradicts `save_every_rounds={self.save_every_rounds}`: set "
                "`save_every_rounds` instead (a step of a federation is a round)."
            )
        if self.load_best_model_at_end:
            if not self.save_every_rounds:
                raise ValueError("`load_best_model_at_end` needs round checkpoints: set `save_every_rounds` >= 1.")
            if self.save_every_rounds % eval_rounds:
                raise ValueError(
                    "`load_best_model_at_end` needs every checkpoint round to be evaluated: `save_every_rounds` "
                    f"({self.save_every_rounds}) must be a multiple of `eval_every_rounds` ({eval_rounds})."
                )
            if self.metric_for_best_model is None:
                self.metric_for_best_model = DEFAULT_METRIC_FOR_BEST_MODEL
        self.eval_strategy, self.eval_steps = IntervalStrategy.STEPS, eval_rounds
        if self.save_every_rounds:
            self.save_strategy, self.save_steps = SaveStrategy.STEPS, self.save_every_rounds
        else:
            self.save_strategy = SaveStrategy.NO

    def check_processes(self) -> None:
        """Refuse a launch the federation cannot run correctly (checked when a trainer is built, once the
        distributed state exists)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1:
            raise ValueError(
                f"Launched as {launched} processes (WORLD_SIZE={launched}), but the arguments see one: every process "
                "would run the whole federation into the same output_dir. Build the arguments inside the launched "
                "script as FederatedTrainingArguments (on a machine without GPUs it sets use_cpu=True itself), or pass "
                "`--use_cpu`."
            )
        if not self.reset_optimizer_each_round and self.world_size > 1:
            raise ValueError("`reset_optimizer_each_round=False` is supported in a single process only.")

    def local_training_identity(self) -> dict[str, Any]:
        """The local-training settings a checkpoint must match to continue a run (JSON values)."""
        return {
            "learning_rate": self.learning_rate,
            "local_max_steps": self.local_max_steps,
            "local_epochs": self.local_epochs if self.local_max_steps <= 0 else None,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "lr_scheduler_type": str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)),
            "warmup_steps": self.warmup_steps,
            "weight_decay": self.weight_decay,
            "optim": str(getattr(self.optim, "value", self.optim)),
            "max_grad_norm": self.max_grad_norm,
            "reset_optimizer_each_round": self.reset_optimizer_each_round,
            # only when set: checkpoints written before the option existed keep matching the default
            **({"round_lr_scheduler": self.round_lr_scheduler} if self.round_lr_scheduler != "constant" else {}),
        }

    def round_lr_factor(self, round_index: int) -> float:
        """What `round_lr_scheduler` multiplies the learning rate by in round `round_index` (1 in round 1)."""
        progress = (round_index - 1) / self.num_rounds
        if self.round_lr_scheduler == "linear":
            return 1.0 - progress
        if self.round_lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    @property
    def effective_server_learning_rate(self) -> float:
        """The server step size: `server_learning_rate`, or the default of the chosen aggregation."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return _DEFAULT_SERVER_LR[self.aggregation]

    @property
    def effective_client_sampling_seed(self) -> int:
        """Seed of the per-round client sampling: `client_sampling_seed`, else `seed`."""
        return self.seed if self.client_sampling_seed is None else self.client_sampling_seed

    def num_sampled_clients(self, num_available: int) -> int:
        """How many of `num_available` training clients one round samples."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, num_available)
        return max(1, min(num_available, math.ceil(self.client_fraction * num_available)))


def _has_accelerator() -> bool:
    """Whether torch sees a CUDA, XPU or MPS device."""
    import torch

    if torch.cuda.is_available():
        return True
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
