"""Round checkpoints of `FederatedTrainer`: layout, atomic writes, exact resume (in-process and after a real
SIGKILL), and clear errors for damaged or mismatched checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, TrainerCallback, default_data_collator

import peft_c2a
from peft_c2a.federated import CheckpointError, latest_checkpoint, read_checkpoint
from peft_c2a.federated import checkpoint as checkpoint_module
from peft_c2a.federated import server as server_module
from peft_c2a.federated.checkpoint import MANIFEST, list_checkpoints

from ..conftest import NUM_LABELS, tiny_bert_config
from ..federated_utils import fed_args, skewed_clients, tiny_model
from ..federated_worker import FINAL_HISTORY, FINAL_STATE, RUN_INFO, KillableTrainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUND_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "trainable_state.safetensors",
    "server_optimizer.safetensors",
    "rng_state.safetensors",
    "federation_state.json",
    "history.json",
    MANIFEST,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: extra intra-op threads only spin (badly so on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- helpers -----------------------------------------------------------------------------------------------------


def make(output_dir, model=None, clients=None, **overrides) -> KillableTrainer:
    """A six-client federation (three clients a round, FedAdam, a checkpoint every round)."""
    train, evals = clients if clients is not None else skewed_clients(6, size=16, eval_size=8)
    values = dict(num_rounds=4, clients_per_round=3, aggregation="fedadam", save_every_rounds=1)
    values.update(overrides)
    return KillableTrainer(
        model if model is not None else tiny_model("c2a"),
        fed_args(output_dir, **values),
        train,
        evals,
        data_collator=default_data_collator,
    )


def assert_states_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def without_times(record: dict) -> dict:
    return {key: value for key, value in record.items() if not key.endswith("time")}


def file_fingerprints(folder: Path) -> dict:
    """name -> (mtime_ns, sha256, inode) for every file in `folder` (and the folder's own inode)."""
    out = {".": os.stat(folder).st_ino}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            out[str(path.relative_to(folder))] = (stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def assert_checkpoint_is_safe(folder: Path) -> None:
    """Only safetensors, JSON and the model card; the manifest hashes every other file."""
    files = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}
    assert files, folder
    unsafe = sorted(name for name in files if not name.endswith((".safetensors", ".json", ".md")))
    assert not unsafe, f"{folder} holds files that are not safetensors/JSON/Markdown: {unsafe}"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["sha256"]) == files - {MANIFEST}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def no_temporary_folders(output_dir: Path) -> bool:
    return not [path.name for path in Path(output_dir).iterdir() if path.name.startswith(".round-")]


class RoundStates(TrainerCallback):
    """Records the model's trainable tensors after every round (the model holds the new global state then)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {
            name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad
        }


# ---- layout --------------------------------------------------------------------------------------------------------


def test_every_round_checkpoint_is_complete_and_loads_as_adapter(tmp_path):
    trainer = make(tmp_path, num_rounds=3)
    recorder = RoundStates()
    trainer.add_callback(recorder)
    trainer.train()
    final = trainer.get_trainable_state()

    assert [round_index for round_index, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert latest_checkpoint(tmp_path) == tmp_path / "round-3"
    assert no_temporary_folders(tmp_path)
    assert sorted(recorder.states) == [1, 2, 3]
    assert_states_equal(recorder.states[3], final)
    for round_index in (1, 2, 3):
        folder = tmp_path / f"round-{round_index}"
        assert ROUND_FILES <= {path.name for path in folder.iterdir()}
        assert_checkpoint_is_safe(folder)

        global_state = load_file(str(folder / "trainable_state.safetensors"))
        assert_states_equal(global_state, recorder.states[round_index])
        meta = json.loads((folder / "federation_state.json").read_text())
        assert meta["round"] == round_index
        assert meta["aggregation"] == "fedadam"
        assert meta["training_clients"] == [f"client-{i}" for i in range(6)]
        history = json.loads((folder / "history.json").read_text())
        assert [record["round"] for record in history] == list(range(1, round_index + 1))
        assert [without_times(r) for r in history] == [without_times(r) for r in trainer.history[:round_index]]
        server = load_file(str(folder / "server_optimizer.safetensors"))
        assert {key[2:] for key in server if key.startswith("m/")} == set(global_state)
        assert {key[2:] for key in server if key.startswith("v/")} == set(global_state)

        # the adapter files are a plain PEFT adapter holding this round's global state
        torch.manual_seed(0)
        base = BertForSequenceClassification(tiny_bert_config())
        loaded = PeftModel.from_pretrained(base, str(folder))
        assert isinstance(loaded.peft_config["default"], peft_c2a.C2AConfig)
        loaded_state = loaded.state_dict()
        for name, tensor in global_state.items():
            assert torch.equal(loaded_state[name], tensor), (round_index, name)

    # the last round's adapter reproduces the trained model's outputs
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7], [3, 9, 9, 9]]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
    }
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trainer.model(**batch).logits)


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    trainer = make(tmp_path, num_rounds=4, save_total_limit=2, eval_every_rounds=0)
    trainer.train()
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["round-3", "round-4"]
    assert [round_index for round_index, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert_states_equal(load_file(str(tmp_path / "round-4" / "trainable_state.safetensors")), trainer.global_state)


def test_save_every_rounds_also_saves_the_last_round(tmp_path):
    trainer = make(tmp_path, num_rounds=3, save_every_rounds=2, eval_every_rounds=0)
    trainer.train()
    assert [round_index for round_index, _ in list_checkpoints(tmp_path)] == [2, 3]


# ---- exact resume in one process -------------------------------------------------------------------------------


def run_and_resume(tmp_path, **overrides):
    """(uninterrupted 4-round trainer, 2-round trainer, 4-round trainer resumed after round 2)."""
    full = make(tmp_path / "full", **overrides)
    full.train()
    first = make(tmp_path / "split", **{**overrides, "num_rounds": 2})
    first.train()
    fingerprints = {name: file_fingerprints(tmp_path / "split" / name) for name in ("round-1", "round-2")}
    resumed = make(tmp_path / "split", **overrides)
    output = resumed.train(resume_from_checkpoint=True)
    assert output.global_step == 4
    assert resumed.rounds_run == [3, 4], "finished rounds must not be trained again"
    # finished rounds are not rewritten
    for name, before in fingerprints.items():
        assert file_fingerprints(tmp_path / "split" / name) == before, name
    assert [round_index for round_index, _ in list_checkpoints(tmp_path / "split")] == [1, 2, 3, 4]
    assert no_temporary_folders(tmp_path / "split")
    # history: rounds 1..4 once each; rounds 1-2 as the first run wrote them, rounds 3-4 as the uninterrupted run
    assert [record["round"] for record in resumed.history] == [1, 2, 3, 4]
    on_disk = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [record["round"] for record in on_disk] == [1, 2, 3, 4]
    assert [without_times(r) for r in resumed.history[:2]] == [without_times(r) for r in first.history]
    assert [without_times(r) for r in resumed.history] == [without_times(r) for r in full.history]
    return full, first, resumed


def test_resume_is_exact_with_fedadam_server_state(tmp_path, monkeypatch):
    full, first, resumed = run_and_resume(tmp_path)
    assert_states_equal(resumed.get_trainable_state(), full.get_trainable_state())
    assert_states_equal(resumed.global_state, full.global_state)
    assert_states_equal(resumed.server_optimizer.state_dict(), full.server_optimizer.state_dict())

    # the server state is what makes it exact: resuming without it gives a different round 3
    server = load_file(str(tmp_path / "split" / "round-2" / "server_optimizer.safetensors"))
    assert any(key.startswith("m/") and value.abs().sum() > 0 for key, value in server.items())
    real = server_module.make_server_optimizer

    def forgetful(args):
        optimizer = real(args)
        optimizer.load_state_dict = lambda state: None
        return optimizer

    monkeypatch.setattr(server_module, "make_server_optimizer", forgetful)
    shutil.copytree(tmp_path / "split" / "round-2", tmp_path / "forgetful" / "round-2")
    forgot = make(tmp_path / "forgetful", num_rounds=3, save_every_rounds=0, eval_every_rounds=0)
    forgot.train(resume_from_checkpoint=True)
    assert forgot.rounds_run == [3]
    assert forgot.history[-1]["train_loss"] == full.history[2]["train_loss"]  # same start, same local training
    round_3 = load_file(str(tmp_path / "full" / "round-3" / "trainable_state.safetensors"))
    assert not all(torch.equal(forgot.global_state[key], round_3[key]) for key in round_3)


def test_resume_is_exact_with_carried_over_local_optimizer(tmp_path):
    full, first, resumed = run_and_resume(
        tmp_path, reset_optimizer_each_round=False, aggregation="fedavg", clients_per_round=4
    )
    assert_states_equal(resumed.get_trainable_state(), full.get_trainable_state())
    folder = tmp_path / "split" / "round-2"
    assert (folder / "local_optimizer.safetensors").is_file()
    meta = json.loads((folder / "federation_state.json").read_text())
    assert meta["local_optimizer"] is not None and meta["local_optimizer"]["param_groups"]
    assert_checkpoint_is_safe(folder)
    saved = resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer") else resumed.optimizer
    reference = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    for (_, got), (_, want) in zip(
        sorted(saved.state_dict()["state"].items()), sorted(reference.state_dict()["state"].items()), strict=True
    ):
        for key in want:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key


def test_resume_is_exact_in_local_only_mode(tmp_path):
    full, first, resumed = run_and_resume(tmp_path, federation_mode="local", aggregation="fedavg")
    folder = tmp_path / "split" / "round-2"
    assert (folder / "client_states.safetensors").is_file()
    assert_checkpoint_is_safe(folder)
    meta = json.loads((folder / "federation_state.json").read_text())
    assert meta["client_state_order"] == sorted(first.client_states) and first.client_states
    assert sorted(resumed.client_states) == sorted(full.client_states)
    for name in full.client_states:
        assert_states_equal(resumed.client_states[name], full.client_states[name])
    assert_states_equal(resumed.get_trainable_state(), full.get_trainable_state())


# ---- atomic writes ----------------------------------------------------------------------------------------------


def _crash_in_save_file(monkeypatch, trainer):
    real = checkpoint_module.save_file
    written = []

    def save_file(state, filename, *args, **kwargs):
        if ".round-2.tmp" in filename:
            written.append(filename)
            if len(written) == 2:  # the first file of round 2 is on disk, the second fails half way
                Path(filename).write_bytes(b"partial")
                raise OSError("No space left on device")
        return real(state, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


def _crash_in_write_extra(monkeypatch, trainer):
    real = trainer.model.save_pretrained
    calls = []

    def save_pretrained(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            real(path, *args, **kwargs)
            raise OSError("disk gone while writing the adapter")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trainer.model, "save_pretrained", save_pretrained)


def _crash_before_rename(monkeypatch, trainer):
    real = checkpoint_module._fsync
    calls = []

    def fsync(path):
        if ".round-2.tmp" in str(path) and path.name == MANIFEST:
            calls.append(path)
            raise OSError("power cut")
        return real(path)

    monkeypatch.setattr(checkpoint_module, "_fsync", fsync)


@pytest.mark.parametrize("crash", [_crash_in_save_file, _crash_in_write_extra, _crash_before_rename])
def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path, monkeypatch, crash):
    trainer = make(tmp_path / "run", num_rounds=3, eval_every_rounds=0)
    crash(monkeypatch, trainer)
    with pytest.raises(OSError):
        trainer.train()
    monkeypatch.undo()
    run = tmp_path / "run"
    assert not (run / "round-2").exists()
    assert not (run / "round-3").exists()
    assert latest_checkpoint(run) == run / "round-1"
    assert [round_index for round_index, _ in list_checkpoints(run)] == [1]
    tensors, documents = read_checkpoint(run / "round-1")  # intact: every hash matches
    assert documents["federation_state.json"]["round"] == 1

    # resuming after the crash continues from round 1 and gives the uninterrupted result
    resumed = make(run, num_rounds=3, eval_every_rounds=0)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.rounds_run == [2, 3]
    reference = make(tmp_path / "reference", num_rounds=3, eval_every_rounds=0)
    reference.train()
    assert_states_equal(resumed.get_trainable_state(), reference.get_trainable_state())
    assert [round_index for round_index, _ in list_checkpoints(run)] == [1, 2, 3]


# ---- damaged or mismatched checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> Path:
    """A finished 2-round FedAdam run with checkpoints round-1 and round-2."""
    out = tmp_path_factory.mktemp("two_rounds")
    make(out, num_rounds=2, eval_every_rounds=0).train()
    return out


@pytest.fixture
def run_dir(two_rounds, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)
    return out


def assert_rejected(trainer: KillableTrainer, resume, match: str) -> CheckpointError:
    """Resuming raises a `CheckpointError` before any training and leaves the model and the folder alone."""
    output_dir = Path(trainer.args.output_dir)
    before = trainer.get_trainable_state()
    listing = sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*")) if output_dir.exists() else []
    with pytest.raises(CheckpointError, match=match) as info:
        trainer.train(resume_from_checkpoint=resume)
    assert isinstance(info.value, ValueError)
    assert trainer.rounds_run == []
    assert_states_equal(trainer.get_trainable_state(), before)
    after = sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*")) if output_dir.exists() else []
    assert after == listing
    return info.value


def test_truncated_state_file_is_rejected(run_dir):
    target = run_dir / "round-2" / "trainable_state.safetensors"
    target.write_bytes(target.read_bytes()[:-100])
    assert_rejected(make(run_dir), True, r"round-2.*trainable_state\.safetensors is corrupt")


def test_edited_state_file_is_rejected(run_dir):
    target = run_dir / "round-2" / "trainable_state.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: still a valid safetensors file
    target.write_bytes(bytes(data))
    load_file(str(target))
    assert_rejected(make(run_dir), True, "SHA-256 does not match")


def test_missing_state_file_is_rejected(run_dir):
    (run_dir / "round-2" / "server_optimizer.safetensors").unlink()
    assert_rejected(make(run_dir), str(run_dir / "round-2"), "is missing")


@pytest.mark.parametrize(
    "edit, match",
    [
        ("drop", "its `m/...` tensors are not those of the global state"),
        ("reshape", "m/.* has shape \\(1, \\d+\\), the global state"),
        ("negative", "v/.* holds non-finite or negative values"),
    ],
)
def test_a_server_optimizer_state_that_cannot_step_the_global_state_is_rejected(run_dir, edit, match):
    # hand-edited and re-hashed, so only the content check can catch it: a missing or misshapen moment would fail in
    # the next server step (after a round of training), a negative second moment would make the global state NaN
    folder = run_dir / "round-2"
    target = folder / "server_optimizer.safetensors"
    state = load_file(str(target))
    first = sorted(key for key in state if key.startswith("m/"))[0]
    second = "v/" + first[2:]
    if edit == "drop":
        del state[first]
    elif edit == "reshape":
        state[first] = state[first].reshape(1, -1)
    else:
        state[second] = -state[second]
    save_file(state, str(target))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["sha256"][target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert_rejected(make(run_dir), True, "unusable server optimizer state: " + match)


def test_folder_without_manifest_is_not_a_checkpoint(run_dir):
    (run_dir / "round-2" / MANIFEST).unlink()
    assert [round_index for round_index, _ in list_checkpoints(run_dir)] == [1]
    assert latest_checkpoint(run_dir) == run_dir / "round-1"
    assert_rejected(make(run_dir), str(run_dir / "round-2"), "not a complete")


def test_corrupt_manifest_is_rejected(run_dir):
    (run_dir / "round-2" / MANIFEST).write_text("{not json")
    assert_rejected(make(run_dir), True, "checkpoint_manifest.json is corrupt")


@pytest.mark.parametrize(
    "manifest",
    [
        '"a string"',
        '{"format_version": 1, "sha256": ["x"]}',
        '{"format_version": 1, "sha256": {"trainable_state.safetensors": 3}}',
        '{"format_version": 1, "sha256": {"../round-1/trainable_state.safetensors": "00"}}',
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_corrupt_checkpoint_and_a_stale_copy_of_it_is_cleaned_up(run_dir, manifest):
    (run_dir / "round-2" / MANIFEST).write_text(manifest)
    with pytest.raises(CheckpointError, match="checkpoint_manifest.json is corrupt"):
        read_checkpoint(run_dir / "round-2")
    # a crashed run's leftover copy with such a manifest is removed on the next start, not a crash there
    shutil.copytree(run_dir / "round-2", run_dir / ".round-3.tmp-1")
    assert checkpoint_module.remove_stale_temporaries(run_dir) == [run_dir / ".round-3.tmp-1"]


def test_garbage_json_is_rejected_even_with_a_matching_hash(run_dir):
    folder = run_dir / "round-2"
    (folder / "federation_state.json").write_text("{'round': 2,")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["sha256"]["federation_state.json"] = hashlib.sha256(
        (folder / "federation_state.json").read_bytes()
    ).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert_rejected(make(run_dir), True, "not valid JSON")


def test_garbage_safetensors_is_rejected_even_with_a_matching_hash(run_dir):
    folder = run_dir / "round-2"
    (folder / "rng_state.safetensors").write_bytes(b"\x00" * 5)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["sha256"]["rng_state.safetensors"] = hashlib.sha256(b"\x00" * 5).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert_rejected(make(run_dir), True, "cannot be read")


def test_missing_explicit_checkpoint_is_rejected(run_dir):
    assert_rejected(make(run_dir), str(run_dir / "round-7"), "does not exist")


def test_resume_without_any_checkpoint_is_rejected(tmp_path):
    assert_rejected(make(tmp_path / "empty"), True, "No complete federated checkpoint")
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_checkpoint_beyond_num_rounds_is_rejected(run_dir):
    assert_rejected(make(run_dir, num_rounds=1), True, "beyond `num_rounds=1`")


def test_checkpoint_of_other_clients_is_rejected(run_dir):
    error = assert_rejected(make(run_dir, clients=skewed_clients(5, size=16, eval_size=8)), True, "training_clients")
    assert "client-5" in str(error)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"aggregation": "fedavg"}, "aggregation"),
        ({"federation_mode": "local"}, "federation_mode"),
        ({"learning_rate": 3e-2}, "local_training.learning_rate"),
        ({"local_max_steps": 3}, "local_training.local_epochs"),
        ({"lr_scheduler_type": "cosine"}, "local_training.lr_scheduler_type"),
        ({"server_learning_rate": 0.5}, "server_settings.server_learning_rate"),
        ({"max_client_weight": 0.5}, "server_settings.max_client_weight"),
    ],
)
def test_checkpoint_of_other_settings_is_rejected(run_dir, overrides, field):
    assert_rejected(make(run_dir, **overrides), True, f"{field}=")


def test_checkpoint_of_an_adapter_of_the_same_shape_but_other_settings_is_rejected(run_dir):
    """Same tensor names and shapes, another adapter: the shapes alone cannot tell, the recorded config does."""
    model = tiny_model("c2a", adapter_activation="gelu")
    assert_rejected(make(run_dir, model=model), True, "adapter.adapter_activation='relu'.*'gelu'")


def test_checkpoint_of_other_client_data_under_the_same_names_is_rejected(run_dir):
    train, evals = skewed_clients(6, size=16, eval_size=8)
    train = dict(train)
    train["client-2"] = skewed_clients(6, size=16, eval_size=8, seed=5)[0]["client-2"]  # same size, other examples
    assert_rejected(make(run_dir, clients=(train, evals)), True, "client_data.client-2")


def test_only_num_rounds_may_change_on_resume(run_dir):
    resumed = make(run_dir, num_rounds=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.rounds_run == [3]


@pytest.mark.parametrize("config", [{"bottleneck_dim": 8}, {"bottleneck_dim": 4, "hyper_latent_dim": 16}])
def test_checkpoint_that_does_not_fit_the_model_is_rejected(run_dir, config):
    # the second model matches the checkpoint's first tensors and differs only further on: nothing may be copied
    torch.manual_seed(0)
    other = get_peft_model(
        BertForSequenceClassification(tiny_bert_config()),
        peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=NUM_LABELS, init_seed=0, **config),
    )
    assert_rejected(make(run_dir, model=other), True, "does not fit this model")


def test_checkpoint_of_another_adapter_type_is_rejected(run_dir):
    assert_rejected(make(run_dir, model=tiny_model("lora")), True, "does not fit this model")


# ---- a real crash: SIGKILL in the middle of a round ------------------------------------------------------------


def worker(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "tests.federated_worker", "--output-dir", str(output_dir), *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


@pytest.mark.slow
def test_resume_after_sigkill_mid_round_is_exact(tmp_path):
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    # both at once: they share nothing but the CPU
    killed = worker(killed_dir, "--num-rounds", "4", "--kill-at-round", "3", "--kill-after-steps", "3")
    reference = worker(reference_dir, "--num-rounds", "4")
    killed_rc, killed_err = finish(killed)
    reference_rc, reference_err = finish(reference)
    assert reference_rc == 0, reference_err[-3000:]
    assert killed_rc == -signal.SIGKILL, killed_err[-3000:]

    # the crash came mid round 3: rounds 1-2 are complete, nothing of round 3 counts
    assert not (killed_dir / FINAL_STATE).exists()
    assert [round_index for round_index, _ in list_checkpoints(killed_dir)] == [1, 2]
    assert latest_checkpoint(killed_dir) == killed_dir / "round-2"
    assert not (killed_dir / "round-3").exists()
    assert [r["round"] for r in json.loads((killed_dir / "history.json").read_text())] == [1, 2]
    # a crash while writing round 3 would have left a temporary folder: it must be ignored
    leftover = killed_dir / ".round-3.tmp-999999"
    leftover.mkdir(exist_ok=True)
    (leftover / "trainable_state.safetensors").write_bytes(b"half a file")
    round_2 = file_fingerprints(killed_dir / "round-2")

    resumed_rc, resumed_err = finish(worker(killed_dir, "--num-rounds", "4", "--resume"))
    assert resumed_rc == 0, resumed_err[-3000:]
    assert json.loads((killed_dir / RUN_INFO).read_text())["rounds_run"] == [3, 4]
    assert file_fingerprints(killed_dir / "round-2") == round_2
    assert [round_index for round_index, _ in list_checkpoints(killed_dir)] == [1, 2, 3, 4]

    assert_states_equal(load_file(str(killed_dir / FINAL_STATE)), load_file(str(reference_dir / FINAL_STATE)))
    resumed_history = json.loads((killed_dir / FINAL_HISTORY).read_text())
    reference_history = json.loads((reference_dir / FINAL_HISTORY).read_text())
    assert [r["round"] for r in resumed_history] == [1, 2, 3, 4]
    assert [r["round"] for r in json.loads((killed_dir / "history.json").read_text())] == [1, 2, 3, 4]
    assert [without_times(r) for r in resumed_history] == [without_times(r) for r in reference_history]
    for round_index in (1, 2, 3, 4):
        assert_checkpoint_is_safe(killed_dir / f"round-{round_index}")
