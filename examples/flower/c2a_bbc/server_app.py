"""ServerApp: `FederatedStrategy` samples, aggregates, evaluates and checkpoints; the adapter is saved at the end."""

from __future__ import annotations

from flwr.app import Context

from peft_c2a.flower import FederatedStrategy, make_server_app

from .task import build_model, federation_args, unseen_clients


def strategy(context: Context) -> FederatedStrategy:
    """The strategy over all `num-clients` clients (it waits for every node, then asks which client each holds)."""
    config = context.run_config
    return FederatedStrategy(
        build_model(config),
        federation_args(config),
        unseen_clients=unseen_clients(config),
        min_available_nodes=int(config["num-clients"]),
    )


app = make_server_app(strategy)
