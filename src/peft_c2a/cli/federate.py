"""`peft-c2a federate`: federated fine-tuning of a text classifier over non-IID clients with C2A (or a PEFT baseline).

The default run is the project's main job: the packaged MiniLM-L6 on the packaged BBC News (64 tokens per article),
split over 20 clients by Dirichlet label skew (alpha = 0.1), 4 of them held out as unseen clients; the 16 training
clients all take part in each of 10 rounds, 5 local AdamW steps each (batch 16, lr 1e-2), evaluation every 2 rounds.
It takes about 8 minutes on 2 CPU cores and writes `history.json`, `history.csv`, `accuracy.png`, the label heatmap,
round checkpoints and the final adapter to `--output_dir`.

    peft-c2a federate                                    # or peft-c2a-federate, or python -m peft_c2a.cli federate
    peft-c2a federate --peft_method lora --learning_rate 1e-3
    peft-c2a federate --dataset_path my.csv --text_column body --label_column topic
    peft-c2a federate --metric examples/metrics/macro_f1  # an `evaluate` metric, scored per client
    peft-c2a federate --resume_from_checkpoint true       # continue a killed run

It lives in the package so that the main job runs after a plain `pip install`;
`examples/federated_text_classification.py` is a thin script around it (and the file to hand to `accelerate launch` /
`torchrun`). Every `FederatedTrainingArguments` field is a flag (`--num_rounds`, `--clients_per_round`,
`--aggregation fedprox`, `--local_epochs`, `--federation_mode local`, ...); `--help` lists them all.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from datasets import ClassLabel, DatasetDict, load_dataset, load_from_disk
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser

from ..assets import load_bbc_news, minilm_path
from ..federated import (
    FederatedTrainer,
    FederatedTrainingArguments,
    client_datasets_from_partitions,
    compute_metrics_from_evaluate,
    plot_label_heatmap,
)
from ..recipes import (
    AdapterArguments,
    build_classifier,
    choose_unseen_clients,
    split_into_clients,
    tokenize_for_classification,
)

DESCRIPTION = "Federated fine-tuning of a text classifier over non-IID clients with C2A (or a PEFT baseline)."
# an --metric's scores are reported under this prefix, beside (never replacing) the built-in accuracy and macro-F1
METRIC_PREFIX = "metric_"

MAIN_JOB_DEFAULTS = dict(
    output_dir="outputs/federated_text_classification",
    num_rounds=10,
    clients_per_round=16,
    local_max_steps=5,
    eval_every_rounds=2,
    learning_rate=1e-2,  # the rate the benchmark selects for C2A on validation data (docs/benchmarks.md)
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    seed=0,
    report_to="none",
    logging_strategy="no",
    save_total_limit=2,
)


@dataclass
class ScriptArguments(AdapterArguments):
    """What to federate: the PEFT method (`AdapterArguments`), model, data, and how it is split over clients."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model path or Hub name (default: the packaged all-MiniLM-L6-v2)."}
    )
    dataset: str = field(default="bbc_news", metadata={"help": "`bbc_news` (packaged, offline) or a Hub dataset name."})
    dataset_path: Optional[str] = field(
        default=None, metadata={"help": "A CSV / JSON(L) file or a saved `datasets` folder (overrides --dataset)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class (id or name)."})
    group_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column of a client group (e.g. language): each client holds one group, Dirichlet inside."},
    )
    test_size: float = field(default=0.2, metadata={"help": "Test fraction when the data has no test split."})
    num_clients: int = field(default=20, metadata={"help": "Number of clients."})
    dirichlet_alpha: float = field(default=0.1, metadata={"help": "Dirichlet label-skew concentration."})
    min_client_size: int = field(default=8, metadata={"help": "Minimum training examples per client."})
    unseen_client_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of clients held out of training, evaluated as unseen clients."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    export_client_adapters: bool = field(
        default=False,
        metadata={
            "help": "After training, write every client's own static adapter to output_dir/clients/<client> (C2A "
            "with --c2a_use_context false; a plain mergeable LoRA with --c2a_adapter_kind lora). See docs/serving.md."
        },
    )
    metric: Optional[str] = field(
        default=None,
        metadata={
            "help": "An `evaluate` metric scored on every client beside accuracy and macro-F1, reported as "
            f"`{METRIC_PREFIX}<key>`: a Hub name (e.g. accuracy; needs the network) or a local metric folder or "
            "script (e.g. examples/metrics/macro_f1; works offline). Needs `pip install 'peft-c2a[metrics]'`."
        },
    )


def load_data(script: ScriptArguments, seed: int) -> DatasetDict:
    """A `DatasetDict` with `train` and `test` splits, the text column and a `ClassLabel` label column.

    Integer labels keep their values (class `k` is id `k` when the ids are 0..K-1, else ids follow the numeric
    order); string labels get ids in sorted order, and the names are kept. Rows with an empty text are dropped (and
    counted). Raises `ValueError` with one line naming the file and the problem.
    """
    if script.dataset_path:
        path = Path(script.dataset_path)
        if path.is_dir():
            data = load_from_disk(str(path))
        else:
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix.lower())
            if kind is None:
                raise ValueError(f"--dataset_path must be a .csv, .json, .jsonl file or a saved dataset folder: {path}")
            try:
                data = load_dataset(kind, data_files=str(path))
            except Exception as error:  # datasets wraps the parser's error: name the file and the first cause
                cause = error.__cause__ or error
                raise ValueError(f"{path} cannot be read as {kind.upper()}: {str(cause).splitlines()[0]}") from error
    elif script.dataset == "bbc_news":
        data = load_bbc_news(test_size=script.test_size, seed=seed)
    else:
        data = load_dataset(script.dataset)
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    for column in (script.text_column, script.label_column, script.group_column):
        if column and column not in data["train"].column_names:
            raise ValueError(f"Column {column!r} not in the data; it has {data['train'].column_names}.")
    data = _drop_empty_texts(data, script.text_column)
    if not isinstance(data["train"].features[script.label_column], ClassLabel):
        data = _encode_labels(data, script.label_column)
    if "test" not in data:
        split = data["train"].train_test_split(
            test_size=script.test_size, seed=seed, stratify_by_column=script.label_column
        )
        data = DatasetDict({"train": split["train"], "test": split["test"]})
    return data


def _drop_empty_texts(data: DatasetDict, column: str) -> DatasetDict:
    """Drop rows whose text is missing or blank (a tokenizer cannot encode them), saying how many went."""
    kept = data.filter(lambda row: isinstance(row[column], str) and row[column].strip() != "")
    dropped = {split: len(data[split]) - len(kept[split]) for split in data}
    if any(dropped.values()):
        logging.getLogger(__name__).warning("Dropped rows with an empty %r: %s.", column, dropped)
        print(f"dropped rows with an empty {column!r}: {dropped}")
    if len(kept["train"]) == 0:
        raise ValueError(f"Every training row has an empty {column!r}.")
    return kept


def _encode_labels(data: DatasetDict, column: str) -> DatasetDict:
    """Labels as class ids: integers keep their numeric order (0..K-1 stay as they are), strings sort by name."""
    values = sorted({value for split in data for value in data[split][column]}, key=lambda v: (str(type(v)), v))
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        names = [str(value) for value in values]
        index = {value: position for position, value in enumerate(values)}
        features = data["train"].features.copy()
        features[column] = ClassLabel(names=names)
        return data.map(lambda row: {column: index[row[column]]}, features=features)
    return data.class_encode_column(column)


def build_model(
    script: ScriptArguments,
    num_labels: int,
    seed: int,
    num_clients: Optional[int] = None,
    label_names: Optional[list[str]] = None,
) -> torch.nn.Module:
    """The backbone with the chosen PEFT method (`peft_c2a.recipes.build_classifier`), seeded."""
    return build_classifier(
        script.model_name_or_path or str(minilm_path()), script, num_labels, seed, num_clients, label_names
    )


def split_clients(
    script: ScriptArguments, data: DatasetDict, num_labels: int, seed: int
) -> tuple[list[np.ndarray], list[str], np.ndarray, list[np.ndarray]]:
    """Clients of the training split and their personal test splits: `(parts, names, label counts, test parts)`.

    Dirichlet label skew over `num_clients` clients, or, with `--group_column`, clients of one group each with
    Dirichlet labels inside it. A client's test split follows its training label mix, drawn from its own group.
    """
    group = script.group_column
    split = split_into_clients(
        data["train"][script.label_column],
        data["test"][script.label_column],
        num_labels,
        num_clients=script.num_clients,
        alpha=script.dirichlet_alpha,
        min_client_size=script.min_client_size,
        seed=seed,
        train_groups=list(data["train"][group]) if group else None,
        test_groups=list(data["test"][group]) if group else None,
    )
    return split.parts, split.names, split.counts, split.test_parts


def load_metric(name_or_path: str) -> Callable:
    """`--metric`: an `evaluate` metric loaded by Hub name or from a local folder / script, as a `compute_metrics`
    callable whose keys carry `METRIC_PREFIX`.

    Raises `ValueError` (one line for the command) when `evaluate` is missing or the metric cannot be loaded; offline a
    Hub name cannot be fetched, so the message says to pass a local path.
    """
    try:
        import evaluate
    except ImportError as error:
        raise ValueError("--metric needs the `evaluate` package: pip install 'peft-c2a[metrics]'.") from error
    try:
        # keep_in_memory: no cache file per call, so processes of one run never wait on each other's file locks
        metric = evaluate.load(name_or_path, keep_in_memory=True)
    except (FileNotFoundError, ConnectionError) as error:  # evaluate's "neither a local script nor on the Hub"
        raise ValueError(
            f"--metric {name_or_path!r} cannot be loaded ({str(error).splitlines()[0]}). Without the network a Hub "
            "metric name cannot be fetched: pass a local metric folder or script instead, e.g. "
            "--metric examples/metrics/macro_f1 (a folder holding a script of the same name)."
        ) from error
    return compute_metrics_from_evaluate(metric, prefix=METRIC_PREFIX)


def build_parser(prog: Optional[str] = None) -> HfArgumentParser:
    """The command's flags: `ScriptArguments` and every `FederatedTrainingArguments` field, with the main job's
    defaults. `prog` names the command in `--help` (default: the running script's name)."""
    parser = HfArgumentParser((ScriptArguments, FederatedTrainingArguments), prog=prog, description=DESCRIPTION)
    parser.set_defaults(**MAIN_JOB_DEFAULTS)
    return parser


def run(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> FederatedTrainer:
    """Run the federation `argv` describes (default: the command line) and return its trainer.

    Bad input (a missing column, an unreadable file, an unloadable `--metric`, ...) raises `ValueError` before any
    training; `main` turns it into one line.
    """
    parser = build_parser(prog)
    script, args = parser.parse_args_into_dataclasses(args=None if argv is None else list(argv))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.world_size)))
    compute_metrics = load_metric(script.metric) if script.metric else None  # before the data: fail fast
    if script.export_client_adapters and (script.peft_method != "c2a" or script.c2a_use_context):
        raise ValueError(
            "--export_client_adapters needs --peft_method c2a with --c2a_use_context false: only then is a client's "
            "adapter a static one (other methods give every client the same adapter)."
        )

    data = load_data(script, args.seed)
    label_names = data["train"].features[script.label_column].names
    num_labels = len(label_names)
    parts, names, counts, test_parts = split_clients(script, data, num_labels, args.seed)

    path = script.model_name_or_path or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    encoded = tokenize_for_classification(
        data, tokenizer, script.text_column, script.label_column, script.max_seq_length
    )
    clients = client_datasets_from_partitions(encoded["train"], parts, names)
    client_tests = {
        name: encoded["test"].select(part) for name, part in zip(names, test_parts, strict=True) if len(part) > 0
    }
    unseen = choose_unseen_clients(names, script.unseen_client_fraction, args.seed)

    model = build_model(script, num_labels, args.seed, num_clients=len(names), label_names=label_names)
    trainer = FederatedTrainer(
        model=model,
        args=args,
        client_datasets=clients,
        client_eval_datasets=client_tests,
        eval_dataset=encoded["test"],
        unseen_clients=unseen,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{script.peft_method}: {trainable:,} trainable parameters; {len(names)} clients "
            f"({len(unseen)} unseen: {', '.join(unseen) or '-'}), alpha={script.dirichlet_alpha}, "
            f"{args.num_sampled_clients(len(trainer.training_clients))} per round, {args.num_rounds} rounds"
        )
        heatmap = plot_label_heatmap(
            counts, Path(args.output_dir) / "label_heatmap.png", names, label_names, "training labels per client"
        )
        print(f"label heatmap: {heatmap}")

    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # the class names beside the adapter, for pipelines (id2label / label2id)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(args.output_dir)
    if script.export_client_adapters:
        folders = trainer.export_client_adapters()
        if trainer.is_world_process_zero():
            print(f"client adapters: {len(folders)} folders in {Path(args.output_dir) / 'clients'}")
    if trainer.is_world_process_zero():
        print_summary(trainer, counts, names, label_names)
    return trainer


def print_summary(trainer: FederatedTrainer, counts: np.ndarray, names: list[str], label_names: list[str]) -> None:
    """The final per-client table beside the prior-only guess, and the headline figures."""
    last = trainer.history[-1]
    rows = {**last.get("eval_clients", {}), **last.get("eval_unseen_clients", {})}
    metric_keys = sorted({key for scores in rows.values() for key in scores if key.startswith(METRIC_PREFIX)})
    print(
        f"\n{'client':<12} {'role':<7} {'train':>5} {'main label':>16} {'test':>5} {'accuracy':>9} {'prior-only':>10} "
        f"{'macro-F1':>9}" + "".join(f" {key:>{max(9, len(key))}}" for key in metric_keys)
    )
    for name, count in zip(names, counts, strict=True):
        scores = rows.get(name, {})
        role = "unseen" if name in trainer.unseen_clients else "train"
        top = f"{label_names[int(np.argmax(count))]} {count.max() / count.sum():.0%}"
        cells = [f"{scores[key]:.3f}" if key in scores else "-" for key in ("accuracy", "prior_only_accuracy")]
        macro_f1 = f"{scores['macro_f1']:.3f}" if "macro_f1" in scores else "-"
        extra = [f"{scores[key]:.3f}" if key in scores else "-" for key in metric_keys]
        print(
            f"{name:<12} {role:<7} {int(count.sum()):>5} {top:>16} {scores.get('num_examples', 0):>5} "
            f"{cells[0]:>9} {cells[1]:>10} {macro_f1:>9}"
            + "".join(f" {cell:>{max(9, len(key))}}" for cell, key in zip(extra, metric_keys, strict=True))
        )
    figures = [
        ("global accuracy (uniform descriptor)", "eval_global_accuracy"),
        ("personalised accuracy, mean", "eval_personalized_mean_accuracy"),
        ("prior-only guess, personalised mean", "eval_personalized_mean_prior_only_accuracy"),
        ("personalised accuracy, worst client", "eval_personalized_worst_accuracy"),
        ("unseen clients accuracy, mean", "eval_unseen_mean_accuracy"),
        ("prior-only guess, unseen clients mean", "eval_unseen_mean_prior_only_accuracy"),
    ]
    for key in metric_keys:  # the --metric's scores, summarised like accuracy
        figures += [
            (f"global {key}", f"eval_global_{key}"),
            (f"personalised {key}, mean", f"eval_personalized_mean_{key}"),
            (f"unseen clients {key}, mean", f"eval_unseen_mean_{key}"),
        ]
    figures.append(("bytes uploaded per client per round", "bytes_up_per_client"))
    print()
    for label, key in figures:
        if key in last:
            value = last[key]
            print(f"{label:<40} {value:,}" if isinstance(value, int) else f"{label:<40} {value:.4f}")
    model_mean = last.get("eval_personalized_mean_accuracy")
    prior_mean = last.get("eval_personalized_mean_prior_only_accuracy")
    if model_mean is not None and prior_mean is not None:
        gap = 100 * (model_mean - prior_mean)
        verdict = "beats" if gap > 0 else "does NOT beat"
        print(
            f"the model {verdict} the prior-only guess (each client predicting its majority training label) on the "
            f"personalised mean, by {gap:+.1f} points"
        )
    print(f"{'wall time (s)':<40} {last['wall_time']:.0f}")
    print(f"outputs in {trainer.args.output_dir}: history.json, history.csv, accuracy.png, round-*/, adapter")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """The console command (`peft-c2a-federate`, `peft-c2a federate`): `run`, with bad input reported as one line
    that says what to fix instead of a traceback. Returns the exit status."""
    try:
        run(argv, prog)
    except (ValueError, FileNotFoundError) as error:  # bad input, or the packaged assets not installed
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
