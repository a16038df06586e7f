"""The Python blocks of the README and of docs/*.md run as written: offline, in an empty folder, in a fresh process.

README: each block runs on its own (both are complete programs).

docs/*.md, the rule: a file's ```python blocks run in order in ONE process, like a notebook (later blocks use the
names of earlier ones), in an empty folder, with `HF_HUB_OFFLINE=1`, `TOKENIZERS_PARALLELISM=false` and one CPU
thread. A block that cannot run carries `<!-- doctest: skip (reason) -->` on the line right above its fence, with a
non-empty reason. Documented output is checked against what the blocks print, in order:
- `print(...)  # value` must print the line `value` (text after `value: ` explains it and is not compared);
- `#` lines written directly under code (no blank line between) are that code's output, possibly wrapped.
Whitespace is compared collapsed, so outputs may be wrapped at any space.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```python\n", re.M)
SKIP = re.compile(r"<!-- doctest: skip \((.*)\) -->")
INLINE_OUTPUT = re.compile(r"^\s*print\(.*\)  # (.+)$")
# the number of ```python blocks per docs file: a new block, file or deletion has to be noticed here
DOC_BLOCKS = {
    "api.md": 18,
    "benchmarks.md": 0,
    "concepts.md": 4,
    "federated.md": 7,
    "flower.md": 1,
    "index.md": 0,
    "serving.md": 5,
}
# whole files whose blocks do not run yet, each with the reason; the rule above is the goal for them too
NOT_YET_RUN: dict[str, str] = {}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# the docs' training budgets are sized for one core; several threads on a busy machine run many times slower
DOCS_ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


@dataclass
class Block:
    code: str
    line: int  # line of the first code line in the markdown file
    skip: str | None  # the skip reason, None when the block runs


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def doc_blocks(text: str) -> list[Block]:
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].splitlines()
        marker = SKIP.fullmatch(before[-1].strip()) if before else None
        blocks.append(Block(match.group(1), len(before) + 2, marker.group(1).strip() if marker else None))
    return blocks


def stray_markers(text: str) -> list[str]:
    """`doctest:` comments that are not a well-formed skip right above a ```python fence (they would be ignored)."""
    lines = text.splitlines()
    fences = {m.start() for m in FENCE.finditer(text)}
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    stray = []
    for index, line in enumerate(lines):
        if "doctest:" not in line:
            continue
        marker = SKIP.fullmatch(line.strip())
        above_fence = index + 1 < len(lines) and starts[index + 1] in fences
        if marker is None or not marker.group(1).strip() or not above_fence:
            stray.append(f"line {index + 1}: {line.strip()}")
    return stray


def program(blocks: list[Block]) -> str:
    """The runnable blocks as one program, each at its markdown line, so tracebacks name the doc's line numbers."""
    lines: list[str] = []
    for block in blocks:
        if block.skip is None:
            lines += [""] * (block.line - 1 - len(lines)) + block.code.splitlines()
    return "\n".join(lines) + "\n"


def documented_output(code: str) -> list[tuple[str, str]]:
    """`("line", value)` for `print(...)  # value`, `("text", output)` for comment lines right under code."""
    expected, lines, index = [], code.splitlines(), 0
    while index < len(lines):
        line = lines[index]
        inline = INLINE_OUTPUT.match(line)
        if inline:
            expected.append(("line", squash(inline.group(1))))
        elif line.startswith("#") and index and lines[index - 1].strip() and not lines[index - 1].startswith("#"):
            run = []
            while index < len(lines) and lines[index].startswith("#"):
                run.append(lines[index][1:])
                index += 1
            expected.append(("text", squash(" ".join(run))))
            continue
        index += 1
    return expected


def squash(text: str) -> str:
    return " ".join(text.split())


def missing_output(expected: list[tuple[str, str]], stdout: str) -> list[str]:
    """The expectations not found in `stdout`, searching each one after the previous match."""
    printed = [squash(line) for line in stdout.splitlines()]
    missing, position = [], 0
    for kind, value in expected:
        end = find(kind, value, printed, position)
        if end is None:
            missing.append(value)
        else:
            position = end
    return missing


def find(kind: str, value: str, printed: list[str], position: int) -> int | None:
    for start in range(position, len(printed)):
        if kind == "line":
            if value == printed[start] or value.startswith(printed[start] + ":"):
                return start + 1
            continue
        joined = ""
        for end in range(start, len(printed)):
            joined = f"{joined} {printed[end]}".strip()
            if joined == value:
                return end + 1
            if not value.startswith(joined):
                break
    return None


def run_python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_readme_has_its_two_snippets():
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 2 and "get_peft_model" in blocks[0] and "FederatedTrainer" in blocks[1]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_readme_block_runs(index, tmp_path):
    done = run_python(python_blocks(ROOT / "README.md")[index], tmp_path, OFFLINE_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    if index == 0:
        assert (tmp_path / "my-c2a-adapter" / "adapter_model.safetensors").is_file()
    else:
        personalised, prior_only = (float(value) for value in done.stdout.split()[-2:])
        assert 0.0 <= prior_only <= 1.0 and 0.0 <= personalised <= 1.0
        assert (tmp_path / "out" / "round-2").is_dir()


def test_every_docs_python_block_runs_or_says_why_not():
    counts = {}
    for path in sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text()
        blocks = doc_blocks(text)
        counts[path.name] = len(blocks)
        assert not stray_markers(text), f"{path.name}: malformed or misplaced doctest markers {stray_markers(text)}"
        assert all(block.skip is None or block.skip for block in blocks)
        for block in blocks:
            compile(block.code, f"{path.name}:{block.line}", "exec")  # a syntax error would only show in the slow run
    assert counts == DOC_BLOCKS
    assert all(NOT_YET_RUN.values()) and NOT_YET_RUN.keys() <= DOC_BLOCKS.keys()


def test_the_docs_rule_reads_skips_and_outputs():
    text = (
        "intro\n\n```python\nx = 1\nprint(x)  # 1: one\n```\n\n"
        "<!-- doctest: skip (needs a cluster) -->\n```python\nlaunch()\n```\n\n"
        "```python\n# a note, not output\nprint([x, 2])\n# [1,\n# 2]\n```\n"
    )
    blocks = doc_blocks(text)
    assert [block.skip for block in blocks] == [None, "needs a cluster", None]
    assert [block.line for block in blocks] == [4, 10, 14]
    assert "launch" not in program(blocks) and program(blocks).splitlines()[3] == "x = 1"
    expected = [value for block in blocks for value in documented_output(block.code)]
    assert expected == [("line", "1: one"), ("text", "[1, 2]")]
    assert missing_output(expected, "1\n[1, 2]\n") == []
    assert missing_output(expected, "[1, 2]\n1\n") == ["[1, 2]"]  # order matters
    assert stray_markers("<!-- doctest: skip () -->\n```python\nx\n```\n") == ["line 1: <!-- doctest: skip () -->"]
    assert stray_markers("<!-- doctest: skip (why) -->\n\n```python\nx\n```\n") != []


def run_doc(name: str, tmp_path: Path) -> str:
    """Runs a docs file's blocks as its rule says; returns their stdout after checking the documented output."""
    blocks = doc_blocks((ROOT / "docs" / name).read_text())
    done = run_python(program(blocks), tmp_path, DOCS_ENV)
    assert done.returncode == 0, f"docs/{name} (line numbers are the file's):\n{done.stderr[-3000:]}"
    expected = [value for block in blocks if block.skip is None for value in documented_output(block.code)]
    missing = missing_output(expected, done.stdout)
    assert not missing, f"docs/{name}: documented output not printed (in order): {missing}\nstdout:\n{done.stdout}"
    return done.stdout


def check_concepts(tmp_path: Path, stdout: str) -> None:
    adapter = tmp_path / "my-c2a-adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "C2A"


def check_federated(tmp_path: Path, stdout: str) -> None:
    # the first bare number printed is the first block's personalised accuracy (the trainer also logs its rounds)
    accuracy = next(float(line) for line in stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip()))
    assert 0.0 <= accuracy <= 1.0
    run = tmp_path / "outputs" / "bbc-c2a"
    assert (run / "adapter_model.safetensors").is_file() and (run / "round-3" / "adapter_config.json").is_file()
    # the early-stopping block: its scores barely move at that budget, so patience runs out well before round 10
    stopped = json.loads((tmp_path / "out" / "history.json").read_text())
    assert 4 <= len(stopped) < 10
    assert (tmp_path / "label_heatmap.png").is_file()


# what a file's blocks leave behind, checked beyond their exit status and documented output
def check_serving(folder: Path, stdout: str) -> None:
    kinds = {
        name: json.loads((folder / name / "adapter_config.json").read_text())["peft_type"]
        for name in ("client-7-adapter", "client-7-lora", "client-9-lora")
    }
    assert kinds == {"client-7-adapter": "BOTTLENECK", "client-7-lora": "LORA", "client-9-lora": "LORA"}


CHECKS = {"concepts.md": check_concepts, "federated.md": check_federated, "serving.md": check_serving}


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, count in DOC_BLOCKS.items() if count and name not in NOT_YET_RUN])
def test_docs_blocks_run(name, tmp_path):
    stdout = run_doc(name, tmp_path)
    if name in CHECKS:
        CHECKS[name](tmp_path, stdout)
