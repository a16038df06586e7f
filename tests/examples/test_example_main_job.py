"""The main job's script on the real packaged MiniLM and BBC News, shrunk to one short round (slow: real model)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import peft_c2a  # noqa: F401  (registers the C2A type for PeftModel.from_pretrained)
from peft_c2a.assets import load_bbc_news, minilm_path

from ..script_loading import load_script as load_script_at

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "federated_text_classification.py"
SMALL = ["--max_seq_length", "32", "--local_max_steps", "2", "--num_rounds", "1", "--per_device_eval_batch_size", "128"]


def load_script():
    return load_script_at("federated_text_classification", SCRIPT)


@pytest.fixture(scope="module")
def script():
    threads = torch.get_num_threads()
    yield load_script()
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_main_job_writes_history_checkpoint_and_adapter(script, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = script.main(["--output_dir", str(out), "--num_clients", "10", "--clients_per_round", "3", *SMALL])
    printed = capsys.readouterr().out
    assert "unseen" in printed and "personalised accuracy, worst client" in printed
    # the final table sets the model beside the prior-only guess, per client and on the mean, and says which wins
    assert "prior-only" in printed and "prior-only guess, personalised mean" in printed
    assert "beat the prior-only guess" in printed or "beats the prior-only guess" in printed

    history = json.loads((out / "history.json").read_text())
    assert [record["round"] for record in history] == [1]
    record = history[0]
    assert record["num_clients_ok"] == 3
    assert len(trainer.unseen_clients) == 2 and not set(trainer.unseen_clients) & set(record["sampled_clients"])
    assert record["eval_global_num_examples"] == len(load_bbc_news()["test"])
    for key in ("eval_personalized_mean_accuracy", "eval_personalized_worst_accuracy", "eval_unseen_mean_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    assert record["eval_personalized_worst_accuracy"] == min(c["accuracy"] for c in record["eval_clients"].values())
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    assert record["bytes_up"] == 3 * trainable_bytes
    for name in ("history.csv", "accuracy.png", "label_heatmap.png", "adapter_model.safetensors", "training_args.json"):
        assert (out / name).is_file(), name
    pickles = [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert pickles == []  # weights are safetensors, arguments JSON: nothing needs unpickling

    # the round checkpoint is a PEFT adapter that reproduces the trained global state
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    loaded = PeftModel.from_pretrained(base, out / "round-1")
    state = load_file(str(out / "round-1" / "trainable_state.safetensors"))
    loaded_params = dict(loaded.named_parameters())
    for name, tensor in state.items():
        assert torch.equal(loaded_params[name].detach(), tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "head"])
def test_main_job_on_a_csv_with_string_labels(script, tmp_path, method):
    data = load_bbc_news()
    names = data["train"].features["label"].names
    path = tmp_path / "news.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "topic"])
        for row in data["train"].select(range(0, 1780, 6)):
            writer.writerow([row["text"][:400], names[row["label"]]])
    out = tmp_path / method
    trainer = script.main(
        [
            "--output_dir",
            str(out),
            "--dataset_path",
            str(path),
            "--text_column",
            "body",
            "--label_column",
            "topic",
            "--peft_method",
            method,
            "--num_clients",
            "6",
            "--clients_per_round",
            "2",
            "--min_client_size",
            "4",
            *SMALL,
        ]
    )
    record = trainer.history[-1]
    assert record["num_clients_ok"] == 2
    assert record["eval_global_num_examples"] == 60  # 20 % of the 297 rows, stratified
    # the class names travel with the adapter (config.json's id2label), so a pipeline shows them
    assert list(json.loads((out / "config.json").read_text())["id2label"].values()) == sorted(names)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    if method == "head":
        assert trainable == {"classifier.weight", "classifier.bias"}
        assert (out / "round-1" / "trainable_state.safetensors").is_file()
    else:
        assert any("lora_A" in name for name in trainable)
        assert (out / "round-1" / "adapter_model.safetensors").is_file()


def test_bad_dataset_path_and_column_errors(script, tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_text("x")
    with pytest.raises(ValueError, match="must be a .csv"):
        script.main(["--output_dir", str(tmp_path / "o"), "--dataset_path", str(bad)])
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,a\nworld,b\n")
    with pytest.raises(ValueError, match="Column 'topic' not in the data"):
        script.main(["--output_dir", str(tmp_path / "o"), "--dataset_path", str(path), "--label_column", "topic"])


@pytest.mark.slow
def test_main_job_is_reproducible(script, tmp_path):
    # the new classification head and the adapters are initialised from --seed, so two runs agree bit for bit
    states = []
    for run in ("first", "second"):
        out = tmp_path / run
        script.main(["--output_dir", str(out), "--num_clients", "6", "--clients_per_round", "2", *SMALL])
        states.append(load_file(str(out / "round-1" / "trainable_state.safetensors")))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_group_clients_get_test_splits_of_their_own_group(script):
    """With --group_column, a client's personal test split comes from its own group (language) only."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    def split(size: int, seed: int) -> Dataset:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (size,), generator=generator).tolist()
        languages = ["de" if i % 2 else "fr" for i in range(size)]
        features = Features({"text": Value("string"), "label": ClassLabel(num_classes=3), "language": Value("string")})
        return Dataset.from_dict(
            {"text": [f"t{i}" for i in range(size)], "label": labels, "language": languages}, features=features
        )

    data = DatasetDict({"train": split(240, 0), "test": split(120, 1)})
    arguments = script.ScriptArguments(group_column="language", num_clients=6, dirichlet_alpha=0.5, min_client_size=4)
    parts, names, counts, test_parts = script.split_clients(arguments, data, 3, seed=0)
    assert len(parts) == len(names) == len(test_parts) == 6
    train_languages, test_languages = data["train"]["language"], data["test"]["language"]
    for name, part, test_part, count in zip(names, parts, test_parts, counts, strict=True):
        language = {train_languages[int(i)] for i in part}
        assert len(language) == 1 and name.startswith(language.pop()[:2])
        assert test_part.size and {test_languages[int(i)] for i in test_part} == {train_languages[int(part[0])]}
        assert set(np.asarray(data["test"]["label"])[test_part]) <= set(np.flatnonzero(count))


def test_every_c2a_switch_is_a_flag(script):
    """The ablations run from the command line: each C2A switch reaches the adapter's config."""
    from transformers import HfArgumentParser

    flags = [
        "--c2a_use_context", "false", "--c2a_use_label_term", "false", "--c2a_logit_adjustment", "0.5",
        "--c2a_client_embed_dim", "4", "--c2a_hyper_latent_dim", "16", "--c2a_client_embeddings", "true",
        "--bottleneck_dim", "8",
    ]  # fmt: skip
    (arguments,) = HfArgumentParser(script.ScriptArguments).parse_args_into_dataclasses(args=flags)
    model = script.build_model(arguments, num_labels=5, seed=0, num_clients=7)
    config = model.peft_config["default"]
    assert (config.use_context, config.use_label_term, config.logit_adjustment) == (False, False, 0.5)
    assert (config.client_embed_dim, config.hyper_latent_dim, config.num_clients, config.bottleneck_dim) == (
        4,
        16,
        7,
        8,
    )


def test_integer_labels_keep_their_ids_and_string_labels_their_names(script, tmp_path):
    from datasets import Dataset, DatasetDict

    numeric = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [10, 2, 0, 1]})})
    encoded = script._encode_labels(numeric, "label")
    assert encoded["train"].features["label"].names == ["0", "1", "2", "10"]  # numeric order, not '0', '1', '10'
    assert encoded["train"]["label"] == [3, 2, 0, 1]
    named = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": ["sport", "business"]})})
    assert script._encode_labels(named, "label")["train"].features["label"].names == ["business", "sport"]


def test_unreadable_csv_and_empty_texts_give_one_clear_line(script, tmp_path, capsys):
    broken = tmp_path / "broken.csv"
    broken.write_text('text,label\n"unterminated,1\nfine,0\n' + "x,1,extra,fields\n" * 3)
    with pytest.raises(ValueError, match=r"broken\.csv cannot be read as CSV"):
        script.main(["--output_dir", str(tmp_path / "o"), "--dataset_path", str(broken)])
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,0\n   ,1\n")
    with pytest.raises(ValueError, match="Every training row has an empty 'text'"):
        script.main(["--output_dir", str(tmp_path / "o"), "--dataset_path", str(empty)])
    some = script.ScriptArguments(dataset_path=str(tmp_path / "some.csv"))
    rows = "".join(f"text {i},{i % 2}\n" for i in range(10))
    (tmp_path / "some.csv").write_text("text,label\n" + rows + ",1\n")
    data = script.load_data(some, seed=0)
    assert len(data["train"]) + len(data["test"]) == 10
    assert "dropped rows with an empty 'text'" in capsys.readouterr().out


@pytest.mark.slow
def test_accelerate_launch_as_documented_shards_the_clients(tmp_path):
    """The README's multi-process command, on this CPU-only machine: one federation over two processes (each
    process prints nothing of its own, rank 0 prints the summary once), not two federations side by side."""
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", str(root / "examples" / "accelerate" / "two_processes.yaml"), "--main_process_port", str(port),
        str(SCRIPT), "--output_dir", str(output), "--num_clients", "4", "--clients_per_round", "4",
        "--unseen_client_fraction", "0", "--min_client_size", "4", "--save_every_rounds", "0", *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("personalised accuracy, mean") == 1, done.stdout
    assert done.stdout.count("trainable parameters") == 1, done.stdout
    record = json.loads((output / "history.json").read_text())[-1]
    assert record["num_clients_ok"] == 4 and len(record["client_train_loss"]) == 4
