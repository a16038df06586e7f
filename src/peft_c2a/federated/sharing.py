"""What `FederatedTrainer` shares: `save_model` (the global adapter, its arguments as JSON, the federation's model
card), `push_to_hub` (only those files, never the round checkpoints) and `export_client_adapters` (each client's
own static adapter).

`HubSharing` is a mixin of `FederatedTrainer` (which provides `history` and `clients`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from transformers import Trainer

from .model_card import client_adapter_card, federated_model_card

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

    def export_client_adapters(
        self, output_dir: Optional[str] = None, clients: Optional[Sequence[str]] = None
    ) -> dict[str, Path]:
        """Write every client's personalised adapter as a static adapter folder (C2A without the context
        term; `peft_c2a.export`), one folder per client under `output_dir` (default `args.output_dir/clients`), each
        with a card naming the label counts it was generated from and the client's last personalised scores.

        Training clients get their own private tensors (client-id embedding) and, in the local-only baseline, their
        own state; unseen clients the global state. The model holds the global state again afterwards.

        Returns:
            client name -> its folder (folder names are the client names with characters outside
            `[A-Za-z0-9._-]` replaced by `_`).
        """
        if self.descriptor_spec is None:
            raise TypeError("export_client_adapters needs a C2A model: other adapters are the same for every client.")
        names = list(clients) if clients is not None else self.training_clients + self.unseen_clients
        unknown = [name for name in names if name not in self.clients]
        if unknown:
            raise ValueError(f"Unknown clients {unknown}.")
        root = Path(output_dir or Path(self.args.output_dir) / "clients")
        folders = {name: root / _folder_name(name) for name in names}
        if len(set(folders.values())) != len(folders):
            raise ValueError("Two client names map to the same folder name; export them to separate folders.")
        config = self.model.peft_config[self.model.active_adapter]
        config.check_exportable()  # on every process: only the first one writes, the others wait for it
        if not self.history:  # the server holds the starting state from construction on; no round has run
            raise RuntimeError("Nothing to export yet: run `train()` (or resume from a checkpoint) first.")
        last_scores = _last_client_scores(self.history)
        if self.is_world_process_zero():
            local_mode = self.args.federation_mode == "local"
            try:
                for name, folder in folders.items():
                    client = self.clients[name]
                    own = name in self.training_clients
                    state = self.client_states.get(name, self.global_state) if local_mode else self.global_state
                    self.load_trainable_state(self.client_state(name if own else None, state))
                    self.model.export_adapter(
                        folder,
                        label_distribution=client.label_counts if config.num_labels else None,
                        client_ids=client.client_id if own else None,
                    )
                    card = client_adapter_card(
                        config, name, client.label_counts, config.label_names, last_scores.get(name, {})
                    )
                    (folder / "README.md").write_text(card)
            finally:
                self.load_trainable_state(self.client_state(None, self.global_state))
        self.accelerator.wait_for_everyone()
        return folders


def _folder_name(client: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", client)
    return name if name.strip(".") else f"client_{name}"


def _last_client_scores(history: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each client's scalar scores from the newest evaluation that scored it."""
    scores: dict[str, dict[str, float]] = {}
    for record in reversed(history):
        for group in ("eval_clients", "eval_unseen_clients"):
            for name, values in (record.get(group) or {}).items():
                if name not in scores:
                    scores[name] = {
                        key: float(value)
                        for key, value in values.items()
                        if key != "num_examples" and isinstance(value, (int, float))
                    }
    return scores
