"""Nothing is lost by reusing an output folder or by a crash in the middle of rewriting a checkpoint."""

from __future__ import annotations

import os
import shutil

import pytest

from peft_c2a.federated import CheckpointError, read_checkpoint
from peft_c2a.federated.checkpoint import list_checkpoints, remove_stale_temporaries

from .test_federated_checkpoint import make


def rounds(folder) -> list[int]:
    return [round_index for round_index, _ in list_checkpoints(folder)]


def test_a_fresh_run_refuses_a_folder_that_holds_another_runs_checkpoints(tmp_path):
    make(tmp_path, num_rounds=5, eval_every_rounds=0, save_total_limit=2).train()
    assert rounds(tmp_path) == [4, 5]
    fresh = make(tmp_path, num_rounds=3, eval_every_rounds=0, save_total_limit=2)
    with pytest.raises(
        CheckpointError,
        match=r"another run \(round-4, round-5\).*resume_from_checkpoint=True.*"
        r"overwrite_output_dir=True",
    ):
        fresh.train()
    assert fresh.rounds_run == [] and rounds(tmp_path) == [4, 5]  # nothing deleted, nothing trained


def test_overwrite_output_dir_deletes_the_old_run_first(tmp_path):
    make(tmp_path, num_rounds=5, eval_every_rounds=0, save_total_limit=2).train()
    fresh = make(tmp_path, num_rounds=3, eval_every_rounds=0, save_total_limit=2, overwrite_output_dir=True)
    fresh.train()
    assert rounds(tmp_path) == [2, 3]
    # resuming now continues the new run, not the old one
    resumed = make(tmp_path, num_rounds=4, eval_every_rounds=0, save_total_limit=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.rounds_run == [4]


def test_pruning_never_touches_another_runs_checkpoints(tmp_path):
    other = tmp_path / "other"
    make(other, num_rounds=6, eval_every_rounds=0).train()
    make(tmp_path / "run", num_rounds=1, eval_every_rounds=0).train()
    # a checkpoint of another run placed beside this run's (copied in by hand)
    shutil.copytree(other / "round-6", tmp_path / "run" / "round-6")
    resumed = make(tmp_path / "run", num_rounds=4, eval_every_rounds=0, save_total_limit=2)
    with pytest.raises(CheckpointError):  # the newest checkpoint is the other run's: its identity is checked
        resumed.train(resume_from_checkpoint=True)
    resumed = make(tmp_path / "run", num_rounds=4, eval_every_rounds=0, save_total_limit=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "round-1"))
    assert rounds(tmp_path / "run") == [3, 4, 6]  # round-6 is not this run's: kept, and not counted


def test_resuming_from_an_earlier_round_keeps_the_rounds_it_writes(tmp_path):
    make(tmp_path, num_rounds=5, eval_every_rounds=0).train()  # keeps every checkpoint
    rewind = make(tmp_path, num_rounds=3, eval_every_rounds=0, save_total_limit=2)
    rewind.train(resume_from_checkpoint=str(tmp_path / "round-2"))
    assert rewind.rounds_run == [3]
    # round-3 was just rewritten and stays; rounds 4-5 (not rewritten yet) do not count against the limit
    assert rounds(tmp_path) == [2, 3, 4, 5]
    assert read_checkpoint(tmp_path / "round-3")[1]["federation_state.json"]["num_rounds"] == 3


def test_a_crash_between_the_renames_of_a_rewrite_recovers_the_checkpoint(tmp_path):
    make(tmp_path, num_rounds=2, eval_every_rounds=0).train()
    final = tmp_path / "round-2"
    new_copy = tmp_path / ".round-2.tmp-4242"
    shutil.copytree(final, new_copy)  # the new copy, complete, not yet renamed
    os.replace(final, tmp_path / ".round-2.stale-4242")  # the old copy, moved aside: then the crash
    assert rounds(tmp_path) == [1]
    removed = remove_stale_temporaries(tmp_path)
    assert rounds(tmp_path) == [1, 2]
    assert removed == [tmp_path / ".round-2.stale-4242"]
    read_checkpoint(final)  # verified against its manifest
    assert not [child for child in tmp_path.iterdir() if child.name.startswith(".round-")]


def test_a_damaged_new_copy_falls_back_to_the_old_one(tmp_path):
    make(tmp_path, num_rounds=2, eval_every_rounds=0).train()
    final = tmp_path / "round-2"
    new_copy = tmp_path / ".round-2.tmp-4242"
    shutil.copytree(final, new_copy)
    (new_copy / "trainable_state.safetensors").write_bytes(b"half a file")
    os.replace(final, tmp_path / ".round-2.stale-4242")
    remove_stale_temporaries(tmp_path)
    assert rounds(tmp_path) == [1, 2]
    read_checkpoint(final)


def test_resuming_says_so_at_warning_level(tmp_path, caplog):
    import logging

    make(tmp_path, num_rounds=1, eval_every_rounds=0).train()
    caplog.set_level(logging.WARNING, logger="peft_c2a")
    make(tmp_path, num_rounds=2, eval_every_rounds=0).train(resume_from_checkpoint=True)
    assert any("Resuming the federation after round 1" in record.getMessage() for record in caplog.records)


def test_a_resumed_runs_progress_bar_starts_where_it_stopped(tmp_path):
    from transformers import ProgressCallback

    make(tmp_path, num_rounds=2, eval_every_rounds=0).train()
    resumed = make(tmp_path, num_rounds=3, eval_every_rounds=0, disable_tqdm=False)
    seen = []

    class Watch(ProgressCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(self.training_bar.n)  # where the bar stood during the round that just ended
            super().on_step_end(args, state, control, **kwargs)

    resumed.remove_callback(ProgressCallback)
    resumed.add_callback(Watch())
    resumed.train(resume_from_checkpoint=True)
    assert seen == [2]
