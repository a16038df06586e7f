"""`FederatedTrainer` in several processes (`torchrun`, `accelerate launch`): clients are sharded across the
processes and their updates all-reduced, so the result must match a single process up to float summation order.

Every run here is `tests/federated_worker.py` in fresh processes on CPU (gloo). `accelerate launch --cpu` starts
multi-CPU jobs only through `mpirun` (it runs a single process otherwise), so the accelerate run uses accelerate's
torch-elastic launcher (`--multi_gpu`); the worker's `use_cpu=True` keeps it on CPU with the gloo backend either way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_c2a.federated.checkpoint import MANIFEST, list_checkpoints

from ..federated_worker import FINAL_HISTORY, FINAL_STATE, RUN_INFO

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = ("-m", "tests.federated_worker")
SETTINGS = ("--num-rounds", "4", "--num-clients", "6", "--clients-per-round", "3", "--aggregation", "fedadam")
ATOL = 1e-6
# what each process must agree on exactly: the federation's bookkeeping
EXACT_FIELDS = (
    "round",
    "sampled_clients",
    "num_sampled_clients",
    "num_clients_ok",
    "num_train_examples",
    "local_steps",
    "bytes_down",
    "bytes_up",
    "bytes_up_per_client",
    "failed_clients",
    "rejected_clients",
)

pytestmark = pytest.mark.slow  # every test here starts several Python processes


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def start(*command: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hung launcher can be stopped together with its workers
    )


def finish(process: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the session started for this launcher: it and its workers
        stdout, stderr = process.communicate()
    return process.returncode, stdout + stderr


def torchrun(port: int, output_dir: Path, *extra: str) -> subprocess.Popen:
    return start(
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        *WORKER, "--output-dir", str(output_dir), *SETTINGS, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """Runs that do not depend on each other, all started at once (they only share the CPU)."""
    root = tmp_path_factory.mktemp("distributed")
    port, other_port, median_port = free_ports(3)
    median = ("--robust-aggregation", "median")
    processes = {
        "single": start(*WORKER, "--output-dir", str(root / "single"), *SETTINGS),
        "torchrun": torchrun(port, root / "torchrun"),
        "keep_optimizer": torchrun(other_port, root / "keep_optimizer", "--keep-optimizer"),
        "single_median": start(*WORKER, "--output-dir", str(root / "single_median"), *SETTINGS, *median),
        "torchrun_median": torchrun(median_port, root / "torchrun_median", *median),
    }
    results = {name: finish(process) for name, process in processes.items()}
    return {name: (root / name, *result) for name, result in results.items()}


def successful(launched: dict, name: str) -> Path:
    output_dir, returncode, output = launched[name]
    assert returncode == 0, f"{name} failed ({returncode}):\n{output[-4000:]}"
    return output_dir


def read_run(output_dir: Path) -> tuple[dict, list, dict]:
    return (
        load_file(str(output_dir / FINAL_STATE)),
        json.loads((output_dir / FINAL_HISTORY).read_text()),
        json.loads((output_dir / RUN_INFO).read_text()),
    )


def assert_close_states(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=0, msg=key)


def assert_close_scores(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), where
        for key in expected:
            assert_close_scores(actual[key], expected[key], f"{where}.{key}")
    else:
        assert isinstance(actual, (int, float)) and isinstance(expected, (int, float)), where
        assert math.isclose(actual, expected, rel_tol=0, abs_tol=ATOL), (where, actual, expected)


def assert_same_history(actual: list, expected: list) -> None:
    assert [record["round"] for record in actual] == [record["round"] for record in expected]
    for got, want in zip(actual, expected, strict=True):
        where = f"round {want['round']}"
        for field in EXACT_FIELDS:
            assert got[field] == want[field], (where, field)
        assert_close_scores(got["train_loss"], want["train_loss"], f"{where} train_loss")
        assert_close_scores(got["client_train_loss"], want["client_train_loss"], f"{where} client_train_loss")
        evaluated = sorted(key for key in want if key.startswith("eval_") and key != "eval_time")
        assert evaluated, where
        assert sorted(key for key in got if key.startswith("eval_") and key != "eval_time") == evaluated, where
        for key in evaluated:
            assert_close_scores(got[key], want[key], f"{where} {key}")


def fingerprints(folder: Path) -> dict:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.iterdir())}


def assert_sharded(info: dict, history: list) -> None:
    """Each process trained its own share of every round's clients (process p: sampled[p::2]), none twice."""
    trained = {index: [tuple(pair) for pair in pairs] for index, pairs in info["trained_by_process"].items()}
    assert sorted(trained) == ["0", "1"]
    for index in (0, 1):
        expected = [(r["round"], name) for r in history for name in r["sampled_clients"][index::2]]
        assert trained[str(index)] == expected, index
    assert all(len(r["sampled_clients"]) == 3 for r in history)  # both processes had clients in every round


def assert_complete_checkpoints(output_dir: Path, rounds: list[int], final_state: dict) -> None:
    assert [round_index for round_index, _ in list_checkpoints(output_dir)] == rounds
    assert not [path.name for path in output_dir.iterdir() if path.name.startswith(".")]  # no temporary folders
    for round_index in rounds:
        folder = output_dir / f"round-{round_index}"
        names = {path.name for path in folder.iterdir()}
        assert set(json.loads((folder / MANIFEST).read_text())["sha256"]) == names - {MANIFEST}
    last = load_file(str(output_dir / f"round-{rounds[-1]}" / "trainable_state.safetensors"))
    for key, tensor in final_state.items():
        assert torch.equal(last[key], tensor), key


def test_torchrun_two_processes_match_one_process(launched):
    single_state, single_history, single_info = read_run(successful(launched, "single"))
    output_dir = successful(launched, "torchrun")
    state, history, info = read_run(output_dir)
    assert (single_info["world_size"], single_info["rounds_run"]) == (1, [1, 2, 3, 4])
    assert (info["world_size"], info["rounds_run"]) == (2, [1, 2, 3, 4])
    assert_sharded(info, history)
    assert_close_states(state, single_state)
    assert_same_history(history, single_history)
    # only process 0 wrote: one complete checkpoint per round, holding the state that process 0 ended with
    assert_complete_checkpoints(output_dir, [1, 2, 3, 4], state)
    assert [record["round"] for record in json.loads((output_dir / "history.json").read_text())] == [1, 2, 3, 4]


def test_accelerate_launch_two_processes_resume_a_single_process_checkpoint(launched, tmp_path):
    single_dir = successful(launched, "single")
    single_state, single_history, _ = read_run(single_dir)
    output_dir = tmp_path / "accelerate"
    output_dir.mkdir()
    for name in ("round-1", "round-2"):
        shutil.copytree(single_dir / name, output_dir / name)
    finished = {name: fingerprints(output_dir / name) for name in ("round-1", "round-2")}

    (port,) = free_ports(1)
    process = start(
        "-m", "accelerate.commands.accelerate_cli", "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
        *WORKER, "--output-dir", str(output_dir), *SETTINGS, "--resume",
    )  # fmt: skip
    returncode, output = finish(process)
    assert returncode == 0, output[-4000:]
    state, history, info = read_run(output_dir)
    assert (info["world_size"], info["rounds_run"]) == (2, [3, 4])
    assert_sharded(info, history[2:])
    assert_close_states(state, single_state)
    assert_same_history(history, single_history)
    assert_complete_checkpoints(output_dir, [1, 2, 3, 4], state)
    assert {name: fingerprints(output_dir / name) for name in ("round-1", "round-2")} == finished


def test_robust_aggregation_with_two_processes_matches_one_process(launched):
    # process 0 trains two of a round's three clients, process 1 one: the median needs all three updates
    single_state, single_history, _ = read_run(successful(launched, "single_median"))
    output_dir = successful(launched, "torchrun_median")
    state, history, info = read_run(output_dir)
    assert (info["world_size"], info["rounds_run"]) == (2, [1, 2, 3, 4])
    assert_sharded(info, history)
    assert_close_states(state, single_state)
    assert_same_history(history, single_history)
    # and the median is not the mean: the same federation aggregated by FedAdam on the weighted mean ends elsewhere
    mean_state, _, _ = read_run(successful(launched, "single"))
    assert max((mean_state[key] - single_state[key]).abs().max().item() for key in single_state) > 1e-4


def test_carried_over_local_optimizer_is_refused_with_two_processes(launched):
    output_dir, returncode, output = launched["keep_optimizer"]
    assert returncode != 0
    assert "`reset_optimizer_each_round=False` is supported in a single process only" in output
    assert not output_dir.exists() or not list_checkpoints(output_dir)
    assert not (output_dir / FINAL_STATE).exists()
