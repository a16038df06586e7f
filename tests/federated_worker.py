"""A tiny, deterministic federation run as a separate program, for the resume and multi-process tests.

Run from the repository root:

    python -m tests.federated_worker --output-dir OUT [--resume] [--kill-at-round K --kill-after-steps S]
    python -m torch.distributed.run --nproc_per_node 2 -m tests.federated_worker --output-dir OUT
    accelerate launch --num_processes 2 --cpu -m tests.federated_worker --output-dir OUT

It trains a tiny C2A model over `skewed_clients()` with a checkpoint after every round. With `--kill-at-round K`
the process SIGKILLs itself after `--kill-after-steps S` local training steps of round K (a real crash: no
`finally`, no atexit, no flushing). At the end, process 0 writes `final_state.safetensors` (the trainable state),
`final_history.json` (`trainer.history`) and `run_info.json` (world size, rounds run, and which process trained
which client in which round) into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.federated_utils import fed_args, skewed_clients, tiny_model, token_dataset
else:
    from .federated_utils import fed_args, skewed_clients, tiny_model, token_dataset

from accelerate.utils import gather_object  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from peft_c2a.federated import FederatedTrainer  # noqa: E402

FINAL_STATE = "final_state.safetensors"
FINAL_HISTORY = "final_history.json"
RUN_INFO = "run_info.json"


class KillableTrainer(FederatedTrainer):
    """A `FederatedTrainer` that kills its own process in the middle of one round's local training."""

    def __init__(
        self, *args: Any, kill_at_round: Optional[int] = None, kill_after_steps: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kill_at_round = kill_at_round
        self.kill_after_steps = kill_after_steps
        self.current_round: Optional[int] = None
        self.rounds_run: list[int] = []
        self.trained: list[tuple[int, str]] = []  # (round, client) trained by this process
        self.steps_in_round = 0

    def _run_round(self, round_index: int, ignore_keys_for_eval: Optional[list[str]]) -> dict[str, Any]:
        self.current_round = round_index
        self.rounds_run.append(round_index)
        self.steps_in_round = 0
        return super()._run_round(round_index, ignore_keys_for_eval)

    def _run_local_training(self, name: str, round_index: int, start_state: Any) -> dict[str, Any]:
        self.trained.append((round_index, name))
        return super()._run_local_training(name, round_index, start_state)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.kill_at_round is not None and self.current_round == self.kill_at_round:
            self.steps_in_round += 1
            if self.steps_in_round >= self.kill_after_steps:
                os.kill(os.getpid(), signal.SIGKILL)
        return loss


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-rounds", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=6)
    parser.add_argument("--client-size", type=int, default=16, help="training examples per client")
    parser.add_argument("--clients-per-round", type=int, default=3)
    parser.add_argument("--aggregation", default="fedadam")
    parser.add_argument("--robust-aggregation", default="none")
    parser.add_argument("--federation-mode", default="federated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-optimizer", action="store_true", help="reset_optimizer_each_round=False")
    parser.add_argument("--resume", action="store_true", help="train(resume_from_checkpoint=True)")
    parser.add_argument("--kill-at-round", type=int, default=None)
    parser.add_argument("--kill-after-steps", type=int, default=1)
    return parser.parse_args(argv)


def build_trainer(options: argparse.Namespace) -> KillableTrainer:
    """The same federation (data, model, arguments) for the same options, in any process."""
    clients, eval_clients = skewed_clients(options.num_clients, size=options.client_size, eval_size=8)
    args = fed_args(
        options.output_dir,
        num_rounds=options.num_rounds,
        clients_per_round=options.clients_per_round,
        aggregation=options.aggregation,
        robust_aggregation=options.robust_aggregation,
        federation_mode=options.federation_mode,
        save_every_rounds=1,
        seed=options.seed,
        reset_optimizer_each_round=not options.keep_optimizer,
    )
    return KillableTrainer(
        tiny_model("c2a", seed=options.seed),
        args,
        clients,
        eval_clients,
        eval_dataset=token_dataset(24, seed=options.seed + 99, label_pool=[0, 1, 2]),
        data_collator=default_data_collator,
        kill_at_round=options.kill_at_round,
        kill_after_steps=options.kill_after_steps,
    )


def main(argv: Optional[list[str]] = None) -> None:
    options = parse_args(argv)
    trainer = build_trainer(options)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    trained = {trainer.args.process_index: trainer.trained}
    if trainer.args.world_size > 1:
        trained = {index: pairs for part in gather_object([trained]) for index, pairs in part.items()}
    if trainer.is_world_process_zero():
        out = Path(options.output_dir)
        save_file(trainer.get_trainable_state(), str(out / FINAL_STATE))
        (out / FINAL_HISTORY).write_text(json.dumps(trainer.history, indent=1, default=_json_default))
        info = {
            "world_size": trainer.args.world_size,
            "rounds_run": trainer.rounds_run,
            "trained_by_process": {str(index): pairs for index, pairs in sorted(trained.items())},
        }
        (out / RUN_INFO).write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
