"""The README's Python blocks run as written: each in a fresh process, in an empty folder, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_the_readme_has_its_two_snippets():
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 2 and "get_peft_model" in blocks[0] and "FederatedTrainer" in blocks[1]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_readme_block_runs(index, tmp_path):
    code = python_blocks(ROOT / "README.md")[index]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if index == 0:
        assert (tmp_path / "my-c2a-adapter" / "adapter_model.safetensors").is_file()
    else:
        personalised, prior_only = (float(value) for value in done.stdout.split()[-2:])
        assert 0.0 <= prior_only <= 1.0 and 0.0 <= personalised <= 1.0
        assert (tmp_path / "out" / "round-2").is_dir()
