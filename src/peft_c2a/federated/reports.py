"""What a client's part of a round came to (`ClientReport`), the history record of a round's training, the
per-client scalars a record gives the Trainer's loggers, and what a whole run's history gives `TrainOutput`.

Both engines build reports -- `FederatedTrainer.train_client` in-process, the Flower strategy from a node's reply --
and `FederationServer.finish_round` turns them into the round's record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .metrics import scalar_items

ClientStatus = Literal["ok", "failed", "rejected"]


@dataclass
class ClientReport:
    """What one client's part of a round came to.

    Attributes:
        client: the client's name.
        status: `"ok"` (its update counts), `"failed"` (training raised, or no reply) or `"rejected"` (the server,
            or the client itself, found its update unusable: non-finite, malformed, of the wrong shape).
        bytes_down / bytes_up: what crossed the wire for it (0 for baselines that communicate nothing).
        num_examples: its training examples, the weight of its update (usable reports only).
        train_loss: its mean local training loss (usable reports only).
        local_steps: the optimizer steps it took (usable reports only).
        error: why it failed or was rejected.
    """

    client: str
    status: ClientStatus
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int = 0
    train_loss: float = math.nan
    local_steps: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def round_record(round_index: int, sampled: Sequence[str], reports: Sequence[ClientReport]) -> dict[str, Any]:
    """The history record of a round's training: losses, counts, bytes, and which clients failed or were rejected."""
    usable = [report for report in reports if report.ok]
    examples = sum(report.num_examples for report in usable)
    loss = sum(report.train_loss * report.num_examples for report in usable) / examples if examples else math.nan
    return {
        "round": round_index,
        "train_loss": loss,
        "num_sampled_clients": len(sampled),
        "num_clients_ok": len(usable),
        "num_train_examples": examples,
        "local_steps": sum(report.local_steps for report in usable),
        "bytes_down": sum(report.bytes_down for report in reports),
        "bytes_up": sum(report.bytes_up for report in reports),
        "bytes_up_per_client": max((report.bytes_up for report in usable), default=0),
        "sampled_clients": list(sampled),
        "failed_clients": {report.client: report.error for report in reports if report.status == "failed"},
        "rejected_clients": {report.client: report.error for report in reports if report.status == "rejected"},
        "client_train_loss": {report.client: report.train_loss for report in usable},
    }


def client_curves(record: Mapping[str, Any], scores: Sequence[str] = ("accuracy", "loss")) -> dict[str, float]:
    """A history record's per-client numbers as flat scalars, so that loggers draw a curve per client:
    `eval_clients/<name>/<score>` (own test split), `eval_unseen_clients/<name>/<score>` and
    `clients/<name>/train_loss` (TensorBoard shows them as `eval/clients/...` and `train/clients/...`)."""
    out: dict[str, float] = {}
    for group in ("eval_clients", "eval_unseen_clients"):
        for name, values in sorted((record.get(group) or {}).items()):
            out.update({f"{group}/{name}/{score}": float(values[score]) for score in scores if score in values})
    for name, loss in sorted((record.get("client_train_loss") or {}).items()):
        out[f"clients/{name}/train_loss"] = float(loss)
    return out


def run_summary(history: Sequence[Mapping[str, Any]]) -> tuple[float, dict[str, float]]:
    """`(training_loss, metrics)` of a run for `TrainOutput`: the mean round loss, and the last round's scalars.

    As with the `Trainer`, `metrics["train_loss"]` is the run's loss (what `log_metrics("train", ...)` reports); the
    last round's own stays readable as `last_round_train_loss`.
    """
    losses = [record["train_loss"] for record in history if math.isfinite(record.get("train_loss", math.nan))]
    training_loss = float(sum(losses) / len(losses)) if losses else math.nan
    metrics = scalar_items(history[-1]) if history else {}
    if "train_loss" in metrics:
        metrics["last_round_train_loss"] = metrics["train_loss"]
    metrics["train_loss"] = training_loss
    return training_loss, metrics
