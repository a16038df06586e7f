"""What `FederatedTrainer` shares: `save_model` (the global adapter, its arguments as JSON, the federation's model
card) and `push_to_hub` (only those files, never the round checkpoints).

`HubSharing` is a mixin of `FederatedTrainer` (which provides `history` and `clients`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from transformers import Trainer

from .model_card import federated_model_card

# where `push_to_hub` stages the files it uploads (the leading underscore keeps the Trainer's own pushes off it)
SHAREABLE_DIR = "_shareable"


class HubSharing(Trainer):
    """`save_model` / `push_to_hub` / `create_model_card` of a federation (a mixin of `FederatedTrainer`)."""

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, uploading only what is meant to be shared: the final (global) adapter, the
        tokenizer, `training_args.json` and the model card.

        The plain Trainer uploads the whole `output_dir`, which here holds every `round-*/` checkpoint (RNG states,
        client lists, per-client histories and states) and the example's label heatmap: each client's label
        distribution, which C2A keeps on the client. This one stages the shareable files in
        `output_dir/_shareable/` and uploads that folder.
        """
        original = self.args.output_dir
        kwargs.setdefault("model_name", Path(original).name if self.args.hub_model_id is None else None)
        if kwargs["model_name"] is None:
            kwargs.pop("model_name")
        staging = Path(original) / SHAREABLE_DIR
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self.args.output_dir = original

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """`Trainer.save_model`'s writer, with the arguments saved as JSON instead of a pickled `training_args.bin`
        (so nothing this package writes needs unpickling to read) and the federation's model card."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            target = Path(output_dir if output_dir is not None else self.args.output_dir)
            (target / "training_args.bin").unlink(missing_ok=True)
            (target / "training_args.json").write_text(self.args.to_json_string())
            self.create_model_card(output_dir=str(target))

    def create_model_card(self, *args: Any, output_dir: Optional[str] = None, **kwargs: Any) -> None:
        """Write `README.md`: the federated adapter's card (`model_card.federated_model_card`: tags, how to load
        it with a descriptor, the federation's settings and final scores over clients) instead of the Trainer's."""
        if not self.is_world_process_zero():
            return
        card = federated_model_card(self.model, self.args, self.history, len(self.clients))
        (Path(output_dir or self.args.output_dir) / "README.md").write_text(card)
