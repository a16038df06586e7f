"""Federated fine-tuning of any PEFT model with `transformers.Trainer` machinery.

- `FederationServer`: the server side of a federation (roster, global state, aggregation, history, checkpoints),
  shared by `FederatedTrainer` and the Flower strategy.
- `FederatedTrainingArguments` / `FederatedTrainer`: rounds, client sampling, FedAvg / FedProx / FedAdam / FedYogi,
  local-only and centralised baselines, per-client metrics, bytes accounting, atomic checkpoints and exact resume;
  clients are sharded across processes under `accelerate launch` / `torchrun`.
- `partitioning`: IID, Dirichlet label skew, group (language) skew with Dirichlet labels inside each group, quantity
  skew, personal test splits that follow each client's label mix, and a client x label heatmap.
- `metrics`: accuracy and macro-F1 (scikit-learn), per-client summaries, and `compute_metrics_from_evaluate`, which
  turns any `evaluate` metric into a `compute_metrics` callable.

This package depends on the tuner (`peft_c2a.config`), never the other way round.
"""

from .aggregation import FedAdamServer, FedAvgServer, UpdateAccumulator, make_server_optimizer, state_nbytes
from .arguments import FederatedTrainingArguments
from .checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from .client_splits import (
    client_datasets_from_partitions,
    grouped_partition_like,
    label_counts,
    partition_like,
    plot_label_heatmap,
    sample_like,
)
from .clients import ClientData, DescriptorCollator, DescriptorSpec
from .metrics import (
    classification_metrics,
    compute_metrics_from_evaluate,
    prior_only_accuracy,
    summarize_clients,
    write_history,
)
from .partitioning import (
    dirichlet_label_partition,
    group_dirichlet_partition,
    iid_partition,
    quantity_skew_partition,
)
from .server import ClientReport, FederationServer
from .trainer import FederatedTrainer

__all__ = [
    "CheckpointError",
    "ClientData",
    "ClientReport",
    "DescriptorCollator",
    "DescriptorSpec",
    "FedAdamServer",
    "FedAvgServer",
    "FederatedTrainer",
    "FederationServer",
    "FederatedTrainingArguments",
    "UpdateAccumulator",
    "classification_metrics",
    "client_datasets_from_partitions",
    "compute_metrics_from_evaluate",
    "dirichlet_label_partition",
    "group_dirichlet_partition",
    "grouped_partition_like",
    "iid_partition",
    "label_counts",
    "latest_checkpoint",
    "make_server_optimizer",
    "partition_like",
    "sample_like",
    "plot_label_heatmap",
    "prior_only_accuracy",
    "quantity_skew_partition",
    "read_checkpoint",
    "state_nbytes",
    "summarize_clients",
    "write_history",
]
