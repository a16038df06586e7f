"""What the ServerApp and the ClientApp share: settings from the run config, the data split, the model.

The split is the main job's (`examples/federated_text_classification.py`): BBC News over `num-clients` clients by
Dirichlet label skew, personal test sets that follow each client's label mix, `unseen-fraction` of the clients held
out of training. Every node loads the packaged corpus and keeps only its own partition; a real deployment would read
the node's own data instead.
"""

from __future__ import annotations

import functools

import torch  # noqa: E402
from flwr.app import Context  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from peft_c2a.assets import BBC_LABELS, load_bbc_news, minilm_path  # noqa: E402
from peft_c2a.federated import FederatedTrainingArguments  # noqa: E402
from peft_c2a.recipes import (  # noqa: E402
    AdapterArguments,
    build_classifier,
    choose_unseen_clients,
    split_into_clients,
    tokenize_for_classification,
)

NUM_LABELS = len(BBC_LABELS)


def client_name(index: int) -> str:
    """The name of the client held by the node with `partition-id` `index` (the main job's names)."""
    return f"client-{index:02d}"


def federation_args(run_config: dict, output_dir: str | None = None) -> FederatedTrainingArguments:
    """The federation's `FederatedTrainingArguments`, from the run config (`pyproject.toml`, `--run-config`)."""
    return FederatedTrainingArguments(
        output_dir=output_dir or str(run_config["output-dir"]),
        num_rounds=int(run_config["num-rounds"]),
        clients_per_round=int(run_config["clients-per-round"]),
        local_max_steps=int(run_config["local-max-steps"]),
        aggregation=str(run_config["aggregation"]),
        eval_every_rounds=int(run_config["eval-every-rounds"]),
        save_every_rounds=int(run_config["save-every-rounds"]),
        save_total_limit=2,
        learning_rate=float(run_config["learning-rate"]),
        per_device_train_batch_size=int(run_config["batch-size"]),
        per_device_eval_batch_size=64,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=int(run_config["seed"]),
        resume_from_checkpoint=str(run_config["resume"]) or None,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )


def unseen_clients(run_config: dict) -> list[str]:
    """The clients held out of training (the main job's seeded choice)."""
    names = [client_name(i) for i in range(int(run_config["num-clients"]))]
    return choose_unseen_clients(names, float(run_config["unseen-fraction"]), int(run_config["seed"]))


def build_model(run_config: dict) -> torch.nn.Module:
    """MiniLM with the run's PEFT method, seeded (head and adapters), so server and clients start alike."""
    return _build_model(str(run_config["peft-method"]), int(run_config["bottleneck-dim"]), int(run_config["seed"]))


@functools.cache
def _build_model(method: str, bottleneck_dim: int, seed: int) -> torch.nn.Module:
    # one model per process: a simulation actor serves many nodes, and every message loads the global state anyway
    adapter = AdapterArguments(peft_method=method, bottleneck_dim=bottleneck_dim)
    return build_classifier(str(minilm_path()), adapter, NUM_LABELS, seed)


def node_data(context: Context) -> tuple[str, object, object, object]:
    """This node's client name, training and test datasets (tokenised), and the tokenizer."""
    config = context.run_config
    index, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if partitions != int(config["num-clients"]):
        raise ValueError(
            f"The federation has {partitions} SuperNodes (num-partitions) but the run config says num-clients="
            f"{config['num-clients']}; they must match."
        )
    train, tests, tokenizer = _partitions(
        partitions, float(config["dirichlet-alpha"]), int(config["seed"]), int(config["max-seq-length"])
    )
    return client_name(index), train[index], tests[index], tokenizer


@functools.cache
def _partitions(num_clients: int, alpha: float, seed: int, max_seq_length: int) -> tuple[list, list, object]:
    data = load_bbc_news(test_size=0.2, seed=seed)
    split = split_into_clients(data["train"]["label"], data["test"]["label"], NUM_LABELS, num_clients, alpha, 8, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    encoded = tokenize_for_classification(data, tokenizer, "text", "label", max_seq_length)
    train = [encoded["train"].select(part) for part in split.parts]
    tests = [encoded["test"].select(part) if len(part) else None for part in split.test_parts]
    return train, tests, tokenizer
