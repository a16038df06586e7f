"""One benchmark run, inside its own worker process: the method's model and trainer on the run's clients
(`federation.py`), and the run file.

`benchmarks/federated.py --_worker SPEC` calls `run_single`; the parent process never imports torch for a run.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.support.machine import environment, parameter_counts, reset_peak_rss, status_kb

from .federation import Federation, build_federation
from .protocol import (
    METHODS,
    MODEL_FREE,
    RUN_FORMAT,
    RunSpec,
    atomic_write_json,
    setting,
    tail_mean,
)


def training_arguments(spec: RunSpec, output_dir: str, local_steps: Optional[int] = None) -> Any:
    """The `FederatedTrainingArguments` of a run: identical for every method except what defines the method.

    `local_steps` is the run's resolved steps per round (`Federation.local_steps`); without it the setting must be a
    number."""
    import torch

    from peft_c2a.federated import FederatedTrainingArguments

    settings, method = spec.settings, METHODS[spec.method]
    local_steps = int(settings["local_steps"]) if local_steps is None else local_steps
    bf16 = setting(settings, "precision") == "bf16"
    if method.federation_mode == "centralized":
        # one pooled client per round: give it the examples a federated round processes, not 1/clients_per_round
        local_steps *= settings["clients_per_round"]
    values = dict(
        output_dir=output_dir,
        num_rounds=settings["num_rounds"],
        clients_per_round=settings["clients_per_round"],
        local_max_steps=local_steps,
        # select runs evaluate only where the criterion looks (the last `selection_rounds` rounds); final runs and
        # budget probes need every round's curve
        eval_every_rounds=1,
        eval_delay=settings["num_rounds"] - settings.get("selection_rounds", 1) + 1 if spec.phase == "select" else 0,
        save_every_rounds=0,  # a run is the unit of resumption; per-round checkpoints would only cost time
        learning_rate=spec.lr,
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["eval_batch_size"],
        lr_scheduler_type=settings["lr_scheduler"],
        weight_decay=settings["weight_decay"],
        aggregation=method.aggregation,
        proximal_mu=settings["proximal_mu"],
        federation_mode=method.federation_mode,
        seed=spec.seed,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        round_lr_scheduler=setting(settings, "round_lr_scheduler"),
        # mixed precision: bf16 autocast around every forward (fp32 master weights and optimizer state)
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # the Trainer takes bf16 on a CPU only when told it is on one
    )
    # what defines the method (FedProx's mu of a variant, FedAvg-FT's steps, ...) overrides the shared settings
    return FederatedTrainingArguments(**{**values, **dict(method.trainer_options)})


def derive(history: Sequence[Mapping[str, Any]], phase: str, selection_rounds: int = 1) -> dict[str, Any]:
    """Headline figures of one run from the trainer's history (the select criterion: the personalised mean
    validation accuracy, averaged over the last `selection_rounds` evaluated rounds)."""
    evaluated = [record for record in history if "eval_personalized_mean_accuracy" in record]
    last = evaluated[-1] if evaluated else {}
    final = {
        key: last.get(f"eval_{key}")
        for key in (
            "global_accuracy",
            "personalized_mean_accuracy",
            "personalized_mean_prior_only_accuracy",
            "personalized_worst_accuracy",
            "personalized_weighted_accuracy",
            "personalized_mean_macro_f1",
            "unseen_mean_accuracy",
            "unseen_worst_accuracy",
        )
    }
    step_times = [r["train_time"] / r["local_steps"] for r in history if r.get("local_steps")]
    derived: dict[str, Any] = {
        "rounds_completed": len(history),
        "final_round": last.get("round"),
        "final": final,
        "per_client_accuracy": {c: s.get("accuracy") for c, s in last.get("eval_clients", {}).items()},
        "unseen_client_accuracy": {c: s.get("accuracy") for c, s in last.get("eval_unseen_clients", {}).items()},
        "curves": {
            key: [(r["round"], r.get(f"eval_{key}")) for r in evaluated]
            for key in (
                "personalized_mean_accuracy",
                "personalized_worst_accuracy",
                "global_accuracy",
                "unseen_mean_accuracy",
            )
        },
        # the fewest classes the global model predicted in any evaluated round (1: a collapsed round; final runs only,
        # select runs have no global test set)
        "min_global_predicted_classes": min(
            (r["eval_global_predicted_classes"] for r in evaluated if "eval_global_predicted_classes" in r),
            default=None,
        ),
        "bytes_up_per_client_per_round": max((r.get("bytes_up_per_client", 0) for r in history), default=0),
        "bytes_down_per_client_per_round": max(
            (r["bytes_down"] / r["num_sampled_clients"] for r in history if r.get("num_sampled_clients")), default=0
        ),
        "step_time_s_median": float(np.median(step_times)) if step_times else None,
        "step_time_source": "median over rounds of history train_time / local_steps (local training, aggregation "
        "and state copies of the round, per local optimizer step)",
        "train_time_s": float(sum(r.get("train_time", 0.0) for r in history)),
        "eval_time_s": float(sum(r.get("eval_time", 0.0) for r in history)),
    }
    if phase == "select":
        if selection_rounds == 1:
            derived["criterion"] = {
                "name": "final personalised mean validation accuracy",
                "value": final["personalized_mean_accuracy"],
            }
        else:
            derived["criterion"] = {
                "name": f"personalised mean validation accuracy, mean over the last {selection_rounds} rounds",
                "value": tail_mean(derived["curves"]["personalized_mean_accuracy"], selection_rounds),
            }
    return derived


def prior_only_record(federation: Federation, round_index: int) -> dict[str, Any]:
    """A history record for the prior-only guess: every client predicts its majority training label (the global
    test set: the majority label of all training clients pooled); no model, nothing communicated."""
    from peft_c2a.federated import prior_only_accuracy, summarize_clients

    def labels_of(dataset: Any) -> np.ndarray:
        return np.asarray(dataset["labels"], dtype=np.int64)

    training = [name for name in sorted(federation.clients) if name not in federation.unseen]
    counts = {
        name: np.bincount(labels_of(federation.clients[name]), minlength=federation.num_labels)
        for name in federation.clients
    }
    per_kind: dict[str, dict[str, dict[str, float]]] = {"client": {}, "unseen": {}}
    for name, dataset in federation.client_evals.items():
        accuracy = prior_only_accuracy(counts[name], labels_of(dataset))
        scores = {"accuracy": accuracy, "prior_only_accuracy": accuracy, "num_examples": len(dataset)}
        per_kind["unseen" if name in federation.unseen else "client"][name] = scores
    pooled = sum(counts[name] for name in training)
    record: dict[str, Any] = {
        "round": round_index,
        "local_steps": 0,
        "bytes_up_per_client": 0,
        "bytes_down": 0,
        "num_sampled_clients": 0,
        "eval_global_accuracy": prior_only_accuracy(pooled, labels_of(federation.eval_dataset)),
    }
    record.update(summarize_clients(per_kind["client"], "eval_personalized"))
    record.update(summarize_clients(per_kind["unseen"], "eval_unseen"))
    record["eval_clients"] = dict(sorted(per_kind["client"].items()))
    record["eval_unseen_clients"] = dict(sorted(per_kind["unseen"].items()))
    return record


def write_model_free_run(spec: RunSpec, federation: Federation, output_dir: Path, worker_start: float) -> dict:
    """Run file of a method that trains nothing (the prior-only guess), in the layout of every other run."""
    history = [prior_only_record(federation, spec.settings["num_rounds"])]
    derived = derive(history, spec.phase, spec.settings.get("selection_rounds", 1))
    derived.update({"trainable_params_with_head": 0, "trainable_params_no_head": 0, "total_params": 0})
    derived["memory"] = {"method": "no model: nothing measured", "peak_rss_mb": None, "peak_increase_mb": None}
    derived["train_wall_s"] = 0.0
    derived["wall_time_s"] = time.time() - worker_start
    document = {
        "format": RUN_FORMAT,
        "status": "ok",
        "error": None,
        "config": {
            **{k: v for k, v in asdict(spec).items() if k not in ("settings",)},
            "method_definition": asdict(METHODS[spec.method]),
            "settings": spec.settings,
            "model_path": federation.model_path,
            "label_names": federation.label_names,
            "unseen_clients": federation.unseen,
            "clients": federation.client_info,
        },
        "environment": environment(spec.threads),
        "derived": derived,
        "history": history,
        "complete": True,
    }
    atomic_write_json(output_dir / spec.relative_path(), document)
    return document


def progress_callback(rounds: int) -> Any:
    """A `TrainerCallback` printing one line per round (the federated trainer calls `on_log` once per round)."""
    from transformers import TrainerCallback

    start = time.time()

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
            logs = logs or {}
            accuracy = logs.get("eval_personalized_mean_accuracy")
            shown = f" personalised mean acc {accuracy:.3f}" if accuracy is not None else ""
            print(
                f"    round {state.global_step}/{rounds}: loss {logs.get('train_loss', math.nan):.3f}{shown} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )

    return Progress()


def c2a_round_diagnostics(trainer: Any) -> dict[str, float]:
    """What C2A's hypernetwork is doing after a round, from the model's global state (one probe batch, cheap):

    - `diag_adapter_shift`: mean over sites of `||adapter delta|| / ||hidden state||` on the first evaluation batch of
      the first training client, with its own descriptor (divide by a bottleneck run's to compare update sizes);
    - `diag_generator_row_cosine_{down,up}`: mean pairwise cosine of the generator rows (1: collapsed);
    - `diag_descriptor_sensitivity`: personalised mean accuracy with each client's own descriptor minus with the
      uniform one (how much the descriptor is worth; needs the round's evaluation).
    """
    import torch

    from peft_c2a.diagnostics import adapter_output_shift

    record = trainer.history[-1]
    model = trainer.model
    hyper = model.base_model.c2a_hypernet["default"]
    diagnostics = {f"diag_generator_row_cosine_{key}": value for key, value in hyper.generator_row_cosine().items()}
    clients = [name for name in trainer.training_clients if trainer.clients[name].eval_dataset is not None]
    if clients:
        probe = next(iter(trainer._client_loader(trainer.clients[clients[0]], None, train=False)))
        probe = {key: value.to(trainer.args.device) for key, value in probe.items() if isinstance(value, torch.Tensor)}
        model.eval()
        diagnostics["diag_adapter_shift"] = adapter_output_shift(model, probe)
    own = record.get("eval_clients", {})
    if own:
        gaps = [own[name]["accuracy"] - trainer.evaluate_client(name, own_descriptor=False)["accuracy"] for name in own]
        diagnostics["diag_descriptor_sensitivity"] = float(np.mean(gaps))
    return diagnostics


def logs_diagnostics(spec: RunSpec) -> bool:
    """Whether a run logs `c2a_round_diagnostics`: federated C2A runs, except selection runs, which only need their
    criterion (the descriptor-sensitivity pass re-evaluates every client and costs a C2A run about a sixth of its
    time under language skew)."""
    method = METHODS[spec.method]
    return method.peft_method == "c2a" and method.federation_mode != "local" and spec.phase != "select"


def diagnostics_callback(trainer: Any) -> Any:
    """A `TrainerCallback` adding `c2a_round_diagnostics` to every evaluated round's history record."""
    from transformers import TrainerCallback

    class Diagnostics(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if trainer.history and "eval_clients" in trainer.history[-1]:
                trainer.history[-1].update(c2a_round_diagnostics(trainer))

    return Diagnostics()


def run_single(spec: RunSpec, output_dir: Path) -> dict[str, Any]:
    """Run one benchmark run in this process and write its JSON file atomically; returns the document.

    Meant to run in a fresh worker process (`--_worker`), so that its peak memory is its own.
    """
    import datasets
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, PrinterCallback

    from peft_c2a.federated import FederatedTrainer
    from peft_c2a.recipes import AdapterArguments, build_classifier

    worker_start = time.time()
    torch.set_num_threads(spec.threads)
    # one line per round is the progress report; load reports and map progress bars would bury it
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    federation = build_federation(spec)
    method = METHODS[spec.method]
    if spec.method in MODEL_FREE:
        return write_model_free_run(spec, federation, output_dir, worker_start)
    adapter = AdapterArguments(
        peft_method=method.peft_method,
        bottleneck_dim=spec.settings["bottleneck_dim"],
        lora_r=spec.settings["lora_r"],
        **dict(method.script_options),
    )
    model = build_classifier(
        federation.model_path, adapter, federation.num_labels, spec.seed, num_clients=len(federation.clients)
    )
    counts = parameter_counts(model)
    # the trainer's own history files go to a scratch folder: the run file holds the whole history
    scratch = Path(tempfile.mkdtemp(prefix="federated-bench-trainer-"))
    arguments = training_arguments(spec, str(scratch), federation.local_steps)
    status, error = "ok", None
    try:
        trainer = FederatedTrainer(
            model=model,
            args=arguments,
            client_datasets=federation.clients,
            client_eval_datasets=federation.client_evals,
            eval_dataset=federation.eval_dataset,
            unseen_clients=federation.unseen,
            processing_class=federation.tokenizer,
            data_collator=DataCollatorWithPadding(federation.tokenizer),
            callbacks=[progress_callback(spec.settings["num_rounds"])],
        )
        trainer.remove_callback(PrinterCallback)  # it would print every round's whole log dict
        if logs_diagnostics(spec):
            trainer.add_callback(diagnostics_callback(trainer))
        setup_peak_kb = status_kb("VmHWM")
        baseline_kb = status_kb("VmRSS")
        reset = reset_peak_rss()
        on_cuda = torch.cuda.is_available()
        if on_cuda:  # on a GPU the memory that matters is the device's (the host RSS is mostly libraries)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_baseline = torch.cuda.memory_allocated()
        train_start = time.time()
        try:
            trainer.train()
        except Exception as exc:  # a diverging lr or a failed round is a result, recorded, not a crash
            status, error = "failed", repr(exc)
        train_wall = time.time() - train_start
        peak_kb = status_kb("VmHWM")
        cuda_peak = torch.cuda.max_memory_allocated() if on_cuda else None
        history = trainer.history
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    memory = {
        "method": "fresh worker process; peak RSS (VmHWM) during training and evaluation, with the mark reset via "
        "/proc/self/clear_refs after set-up (data tokenised, model built, trainer constructed)",
        "peak_mark_reset": reset,
        "baseline_rss_mb": baseline_kb / 1024 if baseline_kb else None,
        "peak_rss_mb": peak_kb / 1024 if peak_kb else None,
        "peak_increase_mb": (peak_kb - baseline_kb) / 1024 if reset and peak_kb and baseline_kb else None,
        "setup_peak_rss_mb": setup_peak_kb / 1024 if setup_peak_kb else None,
    }
    if cuda_peak is not None:
        memory["cuda_peak_allocated_mb"] = cuda_peak / 2**20
        memory["cuda_peak_increase_mb"] = (cuda_peak - cuda_baseline) / 2**20
        memory["cuda_method"] = "torch.cuda.max_memory_allocated, reset after set-up"
    derived = derive(history, spec.phase, spec.settings.get("selection_rounds", 1))
    derived.update(counts)
    derived["memory"] = memory
    derived["train_wall_s"] = train_wall
    derived["wall_time_s"] = time.time() - worker_start
    document = {
        "format": RUN_FORMAT,
        "status": status,
        "error": error,
        "config": {
            **{k: v for k, v in asdict(spec).items() if k not in ("settings",)},
            "method_definition": asdict(method),
            "settings": spec.settings,
            "model_path": federation.model_path,
            "label_names": federation.label_names,
            "unseen_clients": federation.unseen,
            "clients": federation.client_info,
            "local_max_steps": arguments.local_max_steps,
        },
        "environment": environment(spec.threads),
        "derived": derived,
        "history": history,
        "complete": True,  # last key: a file with it was written whole (writes are atomic anyway)
    }
    atomic_write_json(output_dir / spec.relative_path(), document)
    return document
