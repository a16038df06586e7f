"""Round checkpoints: written atomically, verified before use, safetensors and JSON only (nothing is unpickled).

A checkpoint is a folder `round-{k}/`. It is assembled in a temporary sibling folder and renamed into place only
once every file is written and flushed, so a crash at any moment leaves either the complete folder or none.
`checkpoint_manifest.json` is written last and lists the SHA-256 of every other file: a folder without it is not a
checkpoint, and a file whose hash differs (truncated, edited, bit rot) makes loading fail with a clear error
instead of resuming from damaged state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_PATTERN = re.compile(r"^round-(\d+)$")
_TEMPORARY_PATTERN = re.compile(r"^\.round-(\d+)\.(tmp|stale)-\d+$")
FORMAT_VERSION = 1
# the files of a federated checkpoint (FederatedTrainer writes all that apply; the Flower strategy the first four)
TRAINABLE_STATE_FILE = "trainable_state.safetensors"
SERVER_STATE_FILE = "server_optimizer.safetensors"
FEDERATION_STATE_FILE = "federation_state.json"
HISTORY_FILE = "history.json"
CLIENT_STATES_FILE = "client_states.safetensors"
CLIENT_PRIVATE_FILE = "client_private_states.safetensors"
OPTIMIZER_FILE = "local_optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"


class CheckpointError(ValueError):
    """A federated checkpoint is missing, incomplete, corrupt or does not match the current run."""


def checkpoint_dir(output_dir: str | os.PathLike, round_index: int) -> Path:
    """Where the checkpoint of round `round_index` lives."""
    return Path(output_dir) / f"round-{round_index}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (folders with a manifest) in `output_dir`, oldest round first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint in `output_dir`, or `None`."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def write_checkpoint(
    output_dir: str | os.PathLike,
    round_index: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    documents: Mapping[str, Any],
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write `round-{round_index}/` atomically and return its path.

    Args:
        output_dir: the run's output folder.
        round_index: the round just finished.
        tensors: file name -> tensors, each written as one safetensors file.
        documents: file name -> JSON-serialisable object.
        write_extra: called with the temporary folder to add more files (e.g. `PeftModel.save_pretrained`).
    """
    final = checkpoint_dir(output_dir, round_index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, state in tensors.items():
        save_file({key: value.detach().contiguous().cpu() for key, value in state.items()}, str(tmp / name))
    for name, document in documents.items():
        (tmp / name).write_text(json.dumps(document, indent=1))
    if write_extra is not None:
        write_extra(tmp)
    files = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
    manifest = {"format_version": FORMAT_VERSION, "round": round_index, "sha256": {f: _sha256(tmp / f) for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in [*(tmp / f for f in files), tmp / MANIFEST]:
        _fsync(path)
    if final.exists():
        # Only reached when a run restarts from an older checkpoint on purpose: the newer folder is replaced whole.
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
    return final


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Verify a checkpoint against its manifest and load it.

    Returns:
        (tensors, documents): safetensors files as `name -> {key: tensor}` and JSON files as `name -> object`.

    Raises:
        CheckpointError: the folder is missing, has no manifest, a file is missing or its hash differs, or a file
            cannot be parsed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a folder.")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        hashes = manifest["sha256"]
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete federated checkpoint.") from error
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / MANIFEST} is corrupt: {error}") from error
    if not isinstance(hashes, dict):  # a manifest that is no object already failed at `manifest["sha256"]`
        raise CheckpointError(f"{path / MANIFEST} is corrupt: expected an object with a `sha256` object.")
    for name, expected in hashes.items():
        # a manifest names files of its own folder only; a path would make it hash (and load) a file elsewhere
        if not isinstance(expected, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{path / MANIFEST} is corrupt: bad entry {name!r}: {expected!r}.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')}, expected {FORMAT_VERSION}."
        )
    tensors, documents = {}, {}
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint file {file} is missing.")
        if _sha256(file) != expected:
            raise CheckpointError(f"Checkpoint file {file} is corrupt (its SHA-256 does not match the manifest).")
        if name.endswith(".safetensors") and "/" not in name:
            try:
                tensors[name] = load_file(str(file))
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"Checkpoint file {file} cannot be read: {error}") from error
        elif name.endswith(".json") and "/" not in name:
            try:
                documents[name] = json.loads(file.read_text())
            except ValueError as error:
                raise CheckpointError(f"Checkpoint file {file} is not valid JSON: {error}") from error
    return tensors, documents


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Clean up after a crashed run: recover, then delete, the `.round-*.tmp-*` / `.round-*.stale-*` folders it left.

    A crash between the two renames of a rewrite (`round-k` moved aside as `.stale-`, the new copy not yet in place)
    leaves no `round-k/` but complete copies in hidden folders: the newest complete one (the new copy, else the old)
    is moved back to `round-k/`. Everything else is deleted: half-written folders, copies of rounds that exist, and
    the unrenamed copy of a first write (that round never counted as checkpointed).

    Returns the folders that went (recovered ones excluded).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    temporaries: dict[int, list[Path]] = {}
    for child in root.iterdir():
        match = _TEMPORARY_PATTERN.match(child.name)
        if match and child.is_dir():
            temporaries.setdefault(int(match.group(1)), []).append(child)
    removed = []
    for round_index, folders in sorted(temporaries.items()):
        final = checkpoint_dir(root, round_index)
        rewritten = any(".stale-" in folder.name for folder in folders)
        if rewritten and not final.exists():
            # the new copy (".tmp-") before the old one (".stale-"); only a copy that verifies is put back
            for folder in sorted(folders, key=lambda path: ".tmp-" not in path.name):
                if _is_complete(folder):
                    os.replace(folder, final)
                    folders.remove(folder)
                    break
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _is_complete(folder: Path) -> bool:
    try:
        read_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def checkpoint_run_id(path: str | os.PathLike) -> Optional[str]:
    """The run a checkpoint belongs to (`run_id` in its `federation_state.json`), or `None` (unknown, unreadable)."""
    try:
        return json.loads((Path(path) / FEDERATION_STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def oldest_kept_round(output_dir: str | os.PathLike, run_id: Optional[str]) -> int:
    """The round of run `run_id`'s oldest complete checkpoint in `output_dir` (0 when it has none yet): the oldest
    round the run can still resume after, so per-round state kept elsewhere (a Flower node's client-private
    tensors) is needed from that round on only."""
    rounds = [index for index, path in list_checkpoints(output_dir) if checkpoint_run_id(path) == run_id]
    return rounds[0] if rounds else 0


def prune_checkpoints(
    output_dir: str | os.PathLike,
    keep: Optional[int],
    run_id: Optional[str] = None,
    up_to_round: Optional[int] = None,
    keep_round: Optional[int] = None,
) -> None:
    """Delete all but the `keep` newest checkpoints (`None` or <= 0 keeps all).

    With `run_id`, only that run's checkpoints are counted and deleted (another run's are never touched); with
    `up_to_round`, only those up to that round (a run resumed from an earlier round keeps the later ones it has not
    rewritten yet); `keep_round` (the best round, for `load_best_model_at_end`) is kept besides the `keep` newest.
    """
    if not keep or keep <= 0:
        return
    found = list_checkpoints(output_dir)
    found = [(index, path) for index, path in found if index != keep_round]
    if up_to_round is not None:
        found = [(index, path) for index, path in found if index <= up_to_round]
    if run_id is not None:
        found = [(index, path) for index, path in found if checkpoint_run_id(path) == run_id]
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def optimizer_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer `state_dict()` into tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a torch optimizer `state_dict()` from `optimizer_to_tensors`' output."""
    state: dict[int, dict[str, Any]] = {}
    for items in (tensors.items(), metadata["scalars"].items()):
        for flat_key, value in items:
            index, key = flat_key.split("/", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": metadata["param_groups"]}


def indexed_states(states: Mapping[str, Mapping[str, torch.Tensor]], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-client states as one flat tensor dict, `"{index in order}/{key}"` (client names never become keys)."""
    return {f"{index}/{key}": value for index, name in enumerate(order) for key, value in states[name].items()}


def unindexed_states(tensors: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of `indexed_states`."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(order):
        prefix = f"{index}/"
        states[name] = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    return states


def rng_states_to_json() -> dict[str, Any]:
    """Python's and numpy's global RNG states as JSON (`python_rng`, `numpy_rng`); torch's goes in a tensor file."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    return {
        "python_rng": [version, list(internal), gauss],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def rng_states_from_json(meta: Mapping[str, Any]) -> None:
    """Restore the RNG states `rng_states_to_json` recorded."""
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    numpy_rng = meta["numpy_rng"]
    np.random.set_state((numpy_rng[0], np.asarray(numpy_rng[1], dtype=np.uint32), *numpy_rng[2:]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        # some file systems refuse to fsync a directory; the rename is still atomic there
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
