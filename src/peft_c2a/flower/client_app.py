"""The Flower `ClientApp`: a node trains and evaluates its own client(s) with a `FederatedTrainer`.

The node's trainer is built by the user's `trainer_fn(context)` from the node's own data (usually the partition
named by `context.node_config["partition-id"]`), so the client computes its descriptor locally and runs exactly the
local training of `FederatedTrainer.train_client`. Three message types are handled:

- `query`: the names of the node's clients, their training example counts and the predictions their evaluation
  scores count (once per run, so the server can map its seeded client sampling onto nodes and hold every later reply
  to these counts);
- `train`: load the global state, train the client named in the config, reply with the update, its status and
  metrics (a client whose training raised replies with its status and error, and no update);
- `evaluate`: load the global state, score every client of the node it names with its own descriptor and (C2A) with
  the uniform one; a client whose evaluation raises is reported by name, the others still are.

Client-private tensors (C2A's client-id embedding, `FederatedTrainer.private_keys`) never leave the node: the server
sends and averages only the shared state, and the node keeps each client's own copy on its disk, one safetensors file
per client and round under the node trainer's `output_dir/client-private-states/`. A message of round `k` starts from
the newest copy of a round before `k` (evaluation: up to `k`), so a federation resumed from the server's round-`k`
checkpoint continues exactly, even when the node had already trained later rounds before the interruption. The
server names the oldest round it can still resume after (`Instruction.oldest_resume_round`); the node deletes the
copies older than the newest one up to that round, and records where it pruned, so that a resume from an older
checkpoint (one the server no longer keeps) fails with an error instead of starting that client's tensors afresh.

Evaluation replies carry the model's scores only: the prior-only reference (`prior_only_accuracy`, the share of the
client's majority training label in its test set) describes the client's label distribution, so it stays on the node.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from ..federated.trainer import FederatedTrainer
from .protocol import (
    OWN_PASS,
    UNIFORM_PASS,
    Instruction,
    NodeDescription,
    decode_evaluate,
    decode_train,
    encode_evaluate_reply,
    encode_query_reply,
    encode_train_reply,
)

logger = logging.getLogger(__name__)

PRIVATE_STATE_DIR = "client-private-states"
PRUNED_MARKER = "pruned-before-round"  # its content: the oldest round whose copy was kept when older ones were deleted

TrainerFactory = Callable[[Context], FederatedTrainer]


def make_client_app(trainer_fn: TrainerFactory) -> ClientApp:
    """A `ClientApp` that runs `FederatedTrainer` local training for the node's clients.

    Args:
        trainer_fn: builds the node's `FederatedTrainer` from the Flower `Context` (model, `FederatedTrainingArguments`
            and the node's own client dataset(s)). It is called for every message: Flower's simulation engine ships
            the app to its workers anew with each message and the deployment engine starts a process per message, so
            keep it cheap by caching the model and the data at module level (as `examples/flower/c2a_bbc/task.py`
            does); every message loads the global state into the model anyway. The trainer's `seed`, `aggregation`
            and `proximal_mu` must match the server's (checked on every message); its other local-training settings
            (learning rate, local steps, batch size, ...) are the node's own.

    Returns:
        a `flwr.clientapp.ClientApp` with `query`, `train` and `evaluate` handlers.
    """
    app = ClientApp()

    def trainer_for(context: Context) -> FederatedTrainer:
        trainer = trainer_fn(context)
        if not isinstance(trainer, FederatedTrainer):
            raise TypeError(f"`trainer_fn` must return a FederatedTrainer, got {type(trainer).__name__}.")
        args = trainer.args
        if args.federation_mode != "federated":
            raise ValueError(
                f"Flower runs federated rounds only; the node's trainer has federation_mode={args.federation_mode!r}."
            )
        if not args.reset_optimizer_each_round:
            raise ValueError(
                "reset_optimizer_each_round=False cannot hold on Flower: a node keeps no state between messages."
            )
        return trainer

    @app.query()
    def query(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        names = sorted(trainer.clients)
        description = NodeDescription(
            names=names,
            num_examples=[trainer.clients[name].num_examples for name in names],
            num_test_examples=[_scored_examples(trainer, name) for name in names],
            seed=trainer.args.seed,
        )
        return Message(encode_query_reply(description), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        start_state, instruction = decode_train(message.content)
        _check_settings(trainer, instruction)
        (name,), (client_id,) = instruction.clients, instruction.client_ids
        _assign_client_id(trainer, name, client_id)
        _restore_private_state(trainer, name, before_round=instruction.server_round)
        report, update = trainer.train_client(name, instruction.server_round, start_state)
        if report.ok:
            _keep_private_state(trainer, name, instruction.server_round, instruction.oldest_resume_round)
        # no update when training raised: the server drops this client from the round, as FederatedTrainer does
        return Message(encode_train_reply(report, update), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        shared_state, instruction = decode_evaluate(message.content)
        _check_settings(trainer, instruction)
        # the uniform-descriptor pass only differs from the own-descriptor one for C2A models
        passes = ((OWN_PASS, True), (UNIFORM_PASS, False)) if trainer.descriptor_spec else ((OWN_PASS, True),)
        scores, errors = {}, {}
        for name, client_id in zip(instruction.clients, instruction.client_ids, strict=True):
            try:
                _assign_client_id(trainer, name, client_id)
                _restore_private_state(trainer, name, before_round=instruction.server_round + 1)
                trainer.load_trainable_state(trainer.client_state(name, shared_state))
                for evaluation_pass, own in passes:
                    client_scores = trainer.evaluate_client(name, own_descriptor=own)
                    client_scores.pop("prior_only_accuracy", None)  # a statistic of the client's labels: it stays here
                    scores[(evaluation_pass, name)] = client_scores
            except Exception as error:  # one client's failure must not hide the other clients' scores
                logger.warning("Evaluation of client %r failed: %r", name, error)
                errors[name] = repr(error)
                for evaluation_pass, _ in passes:
                    scores.pop((evaluation_pass, name), None)
        return Message(encode_evaluate_reply(scores, errors), reply_to=message)

    return app


def _scored_examples(trainer: FederatedTrainer, name: str) -> int:
    """What the node announces for client `name`'s evaluation; test data that cannot even be collated stops the run
    here, before round 1, naming the client (it could never be scored)."""
    try:
        return trainer.count_scored_examples(name)
    except Exception as error:
        raise ValueError(f"The test data of client {name!r} cannot be read for evaluation: {error!r}") from error


def _private_state_dir(trainer: FederatedTrainer, name: str) -> Path:
    # a digest, not the name: a client name is not necessarily a safe file name
    return Path(trainer.args.output_dir) / PRIVATE_STATE_DIR / hashlib.sha256(name.encode()).hexdigest()[:32]


def _restore_private_state(trainer: FederatedTrainer, name: str, before_round: int) -> None:
    """Give the node's (freshly built) trainer the newest private tensors client `name` kept before `before_round`."""
    if not trainer.private_keys:
        return
    trainer.client_private_states.pop(name, None)
    folder = _private_state_dir(trainer, name)
    rounds = _kept_rounds(folder)
    earlier = [index for index in rounds if index < before_round]
    marker = folder / PRUNED_MARKER
    kept_from = int(marker.read_text()) if marker.is_file() else None
    if not earlier and kept_from is not None and before_round <= kept_from:
        raise ValueError(
            f"The private state client {name!r} needs (from before round {before_round}) was deleted on this node: it "
            f"keeps copies from round {kept_from} on, the server's oldest checkpoint when it pruned. Resume "
            "from a checkpoint the server still keeps."
        )
    if earlier:
        state = load_file(folder / f"round-{earlier[-1]}.safetensors")
        if set(state) != set(trainer.private_keys):
            raise ValueError(f"The private state kept for client {name!r} does not fit this model.")
        trainer.client_private_states[name] = state


def _keep_private_state(
    trainer: FederatedTrainer, name: str, server_round: int, oldest_resume_round: Optional[int]
) -> None:
    """Write client `name`'s private tensors of `server_round`; then delete its copies that no resume can need: those
    older than the newest copy up to `oldest_resume_round` (none when the server sent no such round)."""
    state = trainer.client_private_states.get(name)
    if not state:
        return
    folder = _private_state_dir(trainer, name)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"round-{server_round}.safetensors"
    _write_atomically(target, lambda path: save_file({k: v.contiguous() for k, v in state.items()}, str(path)))
    if oldest_resume_round is None:
        return
    rounds = _kept_rounds(folder)
    needed = [index for index in rounds if index <= oldest_resume_round]
    if len(needed) > 1:
        # the marker first: an interruption between the two steps leaves it stricter than the files, never looser
        _write_atomically(folder / PRUNED_MARKER, lambda path: path.write_text(str(needed[-1])))
        for index in needed[:-1]:
            (folder / f"round-{index}.safetensors").unlink(missing_ok=True)


def _kept_rounds(folder: Path) -> list[int]:
    return sorted(
        int(path.stem.split("-")[1]) for path in folder.glob("round-*.safetensors") if path.stem[6:].isdigit()
    )


def _write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    temporary = target.with_name(target.name + ".tmp")
    write(temporary)
    os.replace(temporary, target)


def _check_settings(trainer: FederatedTrainer, instruction: Instruction) -> None:
    """Refuse a server whose seed or aggregation differs: local training would silently be another algorithm."""
    args = trainer.args
    theirs: dict[str, Any] = {"seed": instruction.seed, "aggregation": instruction.aggregation}
    mine: dict[str, Any] = {"seed": args.seed, "aggregation": args.aggregation}
    if args.aggregation == "fedprox" and instruction.proximal_mu is not None:
        theirs["proximal-mu"], mine["proximal-mu"] = instruction.proximal_mu, args.proximal_mu
    for key, value in mine.items():
        same = math.isclose(theirs[key], value) if isinstance(value, float) else theirs[key] == value
        if not same:
            raise ValueError(f"The server runs with {key}={theirs[key]!r}, this node with {key}={value!r}.")


def _assign_client_id(trainer: FederatedTrainer, name: str, client_id: Any) -> None:
    """Use the server's client id: a node knows only its own clients, not where its name sorts among all of them."""
    if name not in trainer.clients:
        raise ValueError(f"This node holds clients {sorted(trainer.clients)}, not {name!r}.")
    client = trainer.clients[name]
    if client.client_id is None:  # the adapter has no client-id embedding
        return
    if client_id is None or int(client_id) < 0:
        raise ValueError(f"The C2A adapter embeds client ids, but the server sent none for client {name!r}.")
    client.client_id = int(client_id)
