"""Federated fine-tuning of a text classifier over non-IID clients with C2A (or a plain PEFT baseline).

The default run is the project's main job: the packaged MiniLM-L6 on the packaged BBC News (64 tokens per article),
split over 20 clients by Dirichlet label skew (alpha = 0.1), 4 of them held out as unseen clients; the 16 training
clients all take part in each of 10 rounds, 5 local AdamW steps each (batch 16, lr 1e-2), evaluation every 2 rounds.
It takes about 8 minutes on 2 CPU cores and writes `history.json`, `history.csv`, `accuracy.png`, the label heatmap,
round checkpoints and the final adapter to `--output_dir`.

    python examples/federated_text_classification.py
    python examples/federated_text_classification.py --peft_method lora --learning_rate 1e-3
    accelerate launch --config_file examples/accelerate/two_processes.yaml \
        examples/federated_text_classification.py                              # clients split over 2 processes
    torchrun --nproc_per_node 2 examples/federated_text_classification.py   # the same
    python examples/federated_text_classification.py --dataset_path my.csv --text_column body --label_column topic
    python examples/federated_text_classification.py --metric examples/metrics/macro_f1  # an `evaluate` metric
    python examples/federated_text_classification.py --resume_from_checkpoint true        # continue a killed run

Every `FederatedTrainingArguments` field is a flag (`--num_rounds`, `--clients_per_round`, `--aggregation fedprox`,
`--proximal_mu`, `--local_epochs`, `--federation_mode local`, ...); `--help` lists them all.

The job itself lives in the package (`peft_c2a.cli.federate`), so it also runs after a plain `pip install` as
`peft-c2a federate ...` (or `peft-c2a-federate ...`); this script keeps the same flags and outputs, and the names
below, for the commands and notebooks that use it. `main(argv)` returns the `FederatedTrainer`.
"""

from __future__ import annotations

import sys

from peft_c2a.cli.federate import (
    MAIN_JOB_DEFAULTS,
    ScriptArguments,
    _drop_empty_texts,
    _encode_labels,
    build_model,
    load_data,
    load_metric,
    print_summary,
    split_clients,
)
from peft_c2a.cli.federate import main as command
from peft_c2a.cli.federate import run as main

__all__ = [
    "MAIN_JOB_DEFAULTS",
    "ScriptArguments",
    "_drop_empty_texts",
    "_encode_labels",
    "build_model",
    "load_data",
    "load_metric",
    "main",
    "print_summary",
    "split_clients",
]

if __name__ == "__main__":
    sys.exit(command(sys.argv[1:]))  # bad input: one line that says what to fix, not a traceback
