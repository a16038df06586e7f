"""A Flower node keeps each client's private tensors (C2A's client-id embedding) on its own disk, one file per round:
it deletes the copies no resume can need any more (the server names its oldest resumable round), and a resume from a
checkpoint older than that fails with an error instead of silently restarting the client's tensors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peft_c2a.flower.client_app import (
    PRIVATE_STATE_DIR,
    PRUNED_MARKER,
    _keep_private_state,
    _private_state_dir,
    _restore_private_state,
)

from .test_flower import C2A_WITH_IDS, assert_states_close, reference_trainer, run_flower


def node_trainer(tmp_path) -> SimpleNamespace:
    """What the private-state helpers read of a node's `FederatedTrainer`."""
    args = SimpleNamespace(output_dir=tmp_path)
    return SimpleNamespace(private_keys=["embedding"], client_private_states={}, args=args)


def kept_rounds(trainer, name) -> list[int]:
    folder = _private_state_dir(trainer, name)
    return sorted(int(path.stem.split("-")[1]) for path in folder.glob("round-*.safetensors"))


def train_rounds(trainer, name, rounds, oldest_resume_round) -> None:
    for index in rounds:
        trainer.client_private_states[name] = {"embedding": torch.full((2,), float(index))}
        _keep_private_state(trainer, name, index, oldest_resume_round(index))


def restored(trainer, name, before_round) -> float:
    _restore_private_state(trainer, name, before_round)
    return float(trainer.client_private_states[name]["embedding"][0])


def test_copies_older_than_the_servers_oldest_checkpoint_are_deleted(tmp_path):
    trainer = node_trainer(tmp_path)
    # a server keeping one checkpoint: before round k it can resume after round k - 1 only
    train_rounds(trainer, "a", [1, 2, 3, 4], lambda index: index - 1)
    assert kept_rounds(trainer, "a") == [3, 4]
    assert (_private_state_dir(trainer, "a") / PRUNED_MARKER).read_text() == "3"
    assert restored(trainer, "a", before_round=5) == 4.0  # the next round
    assert restored(trainer, "a", before_round=4) == 3.0  # a resume from the server's kept round-3 checkpoint
    with pytest.raises(ValueError, match="deleted on this node.*from round 3 on"):
        _restore_private_state(trainer, "a", before_round=3)  # a round-2 checkpoint the server no longer keeps


def test_a_client_sampled_now_and_then_keeps_the_copy_a_resume_needs(tmp_path):
    trainer = node_trainer(tmp_path)
    # trained in rounds 1, 2 and 6; the server's oldest checkpoint is round 4 by round 6
    train_rounds(trainer, "a", [1, 2, 6], lambda index: 4 if index == 6 else 0)
    assert kept_rounds(trainer, "a") == [2, 6]
    assert restored(trainer, "a", before_round=5) == 2.0  # resuming after round 4 needs round 2's copy


def test_without_an_oldest_round_every_copy_stays(tmp_path):
    trainer = node_trainer(tmp_path)
    train_rounds(trainer, "a", [1, 2, 3], lambda index: None)
    assert kept_rounds(trainer, "a") == [1, 2, 3]
    assert not (_private_state_dir(trainer, "a") / PRUNED_MARKER).exists()
    assert restored(trainer, "a", before_round=2) == 1.0


def test_a_flower_federation_keeping_one_checkpoint_prunes_and_still_equals_the_trainer(tmp_path):
    sink = run_flower(tmp_path / "flower", save_total_limit=1)
    reference = reference_trainer(tmp_path / "trainer", overrides=C2A_WITH_IDS)
    assert_states_close(sink["strategy"].global_state, reference.global_state)
    assert [path.name for path in sorted((tmp_path / "flower").glob("round-*"))] == ["round-3"]
    folders = list((tmp_path / "flower").glob(f"node-*/{PRIVATE_STATE_DIR}/*"))
    assert folders
    for folder in folders:
        rounds = sorted(int(path.stem.split("-")[1]) for path in Path(folder).glob("round-*.safetensors"))
        # at most one copy up to round 2 (the oldest checkpoint when round 3 trained), plus round 3's
        assert len([index for index in rounds if index <= 2]) <= 1, (folder, rounds)
    # a client trained in rounds 1 and 2 lost its round-1 copy when round 3 began
    assert any(
        (Path(folder) / PRUNED_MARKER).read_text() == "2"
        for folder in folders
        if (Path(folder) / PRUNED_MARKER).is_file()
    )
