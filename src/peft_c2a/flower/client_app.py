"""The Flower `ClientApp`: a node trains and evaluates its own client(s) with a `FederatedTrainer`.

The node's trainer is built by the user's `trainer_fn(context)` from the node's own data (usually the partition
named by `context.node_config["partition-id"]`), so the client computes its descriptor locally and runs exactly the
local training of `FederatedTrainer.train_client`. Three message types are handled:

- `query`: the names, example counts and evaluability of the node's clients (once per run, so the server can map
  its seeded client sampling onto nodes);
- `train`: load the global state, train the client named in the config, reply with the update and its metrics;
- `evaluate`: load the global state, score every evaluable client of the node with its own descriptor and with the
  uniform one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..federated.trainer import FederatedTrainer
from .records import (
    CLIENTS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    OWN_PREFIX,
    STATE_KEY,
    UNIFORM_PREFIX,
    state_from_record,
    state_to_record,
)

TrainerFactory = Callable[[Context], FederatedTrainer]


def make_client_app(trainer_fn: TrainerFactory, cache_size: int = 8) -> ClientApp:
    """A `ClientApp` that runs `FederatedTrainer` local training for the node's clients.

    Args:
        trainer_fn: builds the node's `FederatedTrainer` from the Flower `Context` (model, `FederatedTrainingArguments`
            and the node's own client dataset(s)). Its `args.seed` must match the server's; it is checked on every
            message. Share one model object per process between calls (e.g. `functools.cache` on the model builder):
            every message loads the global state into it anyway.
        cache_size: trainers kept per process, keyed by (run, node), so a simulation actor that serves the same node
            again does not rebuild it. The deployment engine starts a fresh process per run, where this does not
            matter.

    Returns:
        a `flwr.clientapp.ClientApp` with `query`, `train` and `evaluate` handlers.
    """
    app = ClientApp()
    trainers: OrderedDict[tuple[int, int], FederatedTrainer] = OrderedDict()

    def trainer_for(context: Context) -> FederatedTrainer:
        key = (context.run_id, context.node_id)
        if key in trainers:
            trainers.move_to_end(key)
            return trainers[key]
        trainer = trainer_fn(context)
        if not isinstance(trainer, FederatedTrainer):
            raise TypeError(f"`trainer_fn` must return a FederatedTrainer, got {type(trainer).__name__}.")
        if trainer.args.federation_mode != "federated":
            raise ValueError(
                f"Flower runs federated rounds only; the client's trainer has federation_mode="
                f"{trainer.args.federation_mode!r}."
            )
        trainers[key] = trainer
        while len(trainers) > cache_size:
            trainers.popitem(last=False)
        return trainer

    @app.query()
    def query(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        names = sorted(trainer.clients)
        description = ConfigRecord(
            {
                "names": names,
                "num-examples": [trainer.clients[name].num_examples for name in names],
                "evaluable": [trainer.clients[name].eval_dataset is not None for name in names],
                "seed": trainer.args.seed,
            }
        )
        return Message(RecordDict({CLIENTS_KEY: description}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        config = message.content[CONFIG_KEY]
        name = _check_client(trainer, config)
        _assign_client_id(trainer, name, config)
        start_state = state_from_record(message.content[STATE_KEY])
        report, update = trainer.train_client(name, int(config["server-round"]), start_state)
        if update is None:
            # an error reply: the server drops this client from the round, as FederatedTrainer does
            raise RuntimeError(f"Client {name!r} {report['status']}: {report['error']}")
        metrics = MetricRecord(
            {
                "num-examples": int(report["num_examples"]),
                "train-loss": float(report["train_loss"]),
                "local-steps": int(report["local_steps"]),
            }
        )
        reply = RecordDict(
            {STATE_KEY: state_to_record(update), METRICS_KEY: metrics, CONFIG_KEY: ConfigRecord({"client": name})}
        )
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        trainer = trainer_for(context)
        config = message.content[CONFIG_KEY]
        _check_seed(trainer, config)
        trainer.load_trainable_state(state_from_record(message.content[STATE_KEY]))
        reply = RecordDict()
        for index, name in enumerate(config["clients"]):
            if name not in trainer.clients:
                raise ValueError(f"This node holds clients {sorted(trainer.clients)}, not {name!r}.")
            _assign_client_id(trainer, name, {"client-id": config["client-ids"][index]})
            if trainer.clients[name].eval_dataset is None:
                continue
            for prefix, own in ((OWN_PREFIX, True), (UNIFORM_PREFIX, False)):
                scores = trainer.evaluate_client(name, own_descriptor=own)
                reply[prefix + name] = MetricRecord({key: float(value) for key, value in scores.items()})
        return Message(reply, reply_to=message)

    return app


def _check_seed(trainer: FederatedTrainer, config: ConfigRecord) -> None:
    # local training is seeded by (seed, round, client): a different seed would silently break reproducibility
    if "seed" in config and int(config["seed"]) != trainer.args.seed:
        raise ValueError(f"The server runs with seed {config['seed']}, this client with seed {trainer.args.seed}.")


def _check_client(trainer: FederatedTrainer, config: ConfigRecord) -> str:
    _check_seed(trainer, config)
    name = str(config["client"])
    if name not in trainer.clients:
        raise ValueError(f"This node holds clients {sorted(trainer.clients)}, not {name!r}.")
    return name


def _assign_client_id(trainer: FederatedTrainer, name: str, config: Any) -> None:
    """Use the server's client id: a node knows only its own clients, not where its name sorts among all of them."""
    client = trainer.clients[name]
    client_id = config.get("client-id", -1)
    if client.client_id is not None and client_id is not None and int(client_id) >= 0:
        client.client_id = int(client_id)
