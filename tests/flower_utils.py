"""Flower apps over the tiny federations of `federated_utils`, for the Flower tests.

The functions here run inside Flower's Ray actors, which cannot import the test package: the tests register this
module with cloudpickle to be pickled by value.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from transformers import default_data_collator

from peft_c2a.federated import FederatedTrainer
from peft_c2a.flower import FederatedStrategy, make_client_app

from .federated_utils import fed_args, skewed_clients, tiny_model

NUM_NODES = 3
CLIENT_NAMES = [f"client-{i}" for i in range(NUM_NODES)]


def federation_settings(**overrides: Any) -> dict[str, Any]:
    """The arguments both engines run with in the equality tests (2 of 3 clients per round: sampling matters)."""
    values: dict[str, Any] = dict(
        num_rounds=3,
        clients_per_round=2,
        local_max_steps=4,
        learning_rate=2e-2,
        eval_every_rounds=1,
        save_every_rounds=1,
    )
    values.update(overrides)
    return values


@functools.cache
def shared_model(method: str, model_seed: int, overrides: tuple = ()) -> torch.nn.Module:
    """One model per process and method (every message loads the global state into it anyway). Pickled by value into
    Ray's workers, the cache lasts one message there: it saves rebuilding within a test process."""
    torch.set_num_threads(1)
    return tiny_model(method, seed=model_seed, **dict(overrides))


def node_trainer(context: Context, output_dir: str, method: str, settings: dict[str, Any], overrides: tuple) -> Any:
    """The `FederatedTrainer` of the node whose `partition-id` names one client of `skewed_clients(3)`."""
    train, test = skewed_clients(NUM_NODES)
    name = CLIENT_NAMES[int(context.node_config["partition-id"])]
    return FederatedTrainer(
        shared_model(method, 0, overrides),
        fed_args(Path(output_dir) / f"node-{name}", **settings),
        {name: train[name]},
        {name: test[name]},
        data_collator=default_data_collator,
    )


def client_app(output_dir: str, method: str = "c2a", overrides: tuple = (), **settings: Any) -> ClientApp:
    """The package's ClientApp over the tiny federation."""
    return make_client_app(
        functools.partial(
            node_trainer,
            output_dir=output_dir,
            method=method,
            settings=federation_settings(**settings),
            overrides=overrides,
        )
    )


def server_app(
    output_dir: str,
    sink: dict,
    method: str = "c2a",
    overrides: tuple = (),
    resume: Any = None,
    unseen: tuple = (),
    **settings: Any,
) -> ServerApp:
    """A ServerApp that runs `FederatedStrategy` and leaves the strategy and Flower's result in `sink`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        strategy = FederatedStrategy(
            tiny_model(method, seed=0, **dict(overrides)),
            fed_args(output_dir, **federation_settings(**settings)),
            unseen_clients=unseen,
            min_available_nodes=NUM_NODES,
            node_wait_timeout=120,
        )
        sink["result"] = strategy.start(grid, resume_from_checkpoint=resume)
        sink["strategy"] = strategy

    return app


def hostile_client_app(output_dir: str, **settings: Any) -> ClientApp:
    """Nodes 0 and 1 run the package's ClientApp; node 2 sends a NaN update in round 1, a misshapen one in round 2,
    and in round 3 a proper update with an inflated example count (to take over the weighted average); its evaluation
    replies claim 10,000 test examples in both passes (to take over the pooled global score)."""
    honest = client_app(output_dir, **settings)
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return honest(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if int(context.node_config["partition-id"]) != 2:
            return reply
        content = RecordDict()
        for key, record in reply.content.metric_records.items():
            content[key] = MetricRecord({**dict(record), "num_examples": 10_000.0})
        return Message(content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if int(context.node_config["partition-id"]) != 2:
            return reply
        update = {key: value.clone() for key, value in reply.content["arrays"].to_torch_state_dict().items()}
        metrics = dict(reply.content["metrics"])
        first = next(iter(update))
        server_round = int(message.content["config"]["server-round"])
        if server_round == 1:
            update[first] = update[first] * float("nan")
        elif server_round == 2:
            update[first] = torch.zeros(update[first].numel() + 1)
        else:
            metrics["num-examples"] = 10_000
        content = RecordDict(
            {
                "arrays": ArrayRecord(update),
                "metrics": MetricRecord(metrics),
                "config": ConfigRecord(dict(reply.content["config"])),
            }
        )
        return Message(content, reply_to=message)

    return app


def recording_client_app(output_dir: str, log_path: str, method: str = "c2a", **settings: Any) -> ClientApp:
    """The package's ClientApp, logging what each reply carries (record kinds, keys, tensor names) to `log_path`."""
    honest = client_app(output_dir, method=method, **settings)
    app = ClientApp()

    def recorded(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        content = reply.content
        entry = {
            "type": message.metadata.message_type,
            "arrays": {key: list(record) for key, record in content.array_records.items()},
            "configs": {key: sorted(record) for key, record in content.config_records.items()},
            "metrics": {key: sorted(record) for key, record in content.metric_records.items()},
        }
        with open(log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")
        return reply

    app.query()(recorded)
    app.train()(recorded)
    app.evaluate()(recorded)
    return app
