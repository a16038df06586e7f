"""Run a `FederatedTrainer` federation on Flower's simulation and deployment engines.

- `make_client_app(trainer_fn)`: a Flower `ClientApp` whose node trains and evaluates its own client(s) with a
  `FederatedTrainer` built by `trainer_fn(context)` -- the same local training, descriptors and metrics code as the
  one-machine trainer.
- `FederatedStrategy` / `make_server_app(strategy_fn)`: the server side -- the same client sampling, update
  screening, aggregation (FedAvg / FedProx / FedAdam / FedYogi) and history records as `FederatedTrainer`, plus
  per-round checkpoints and exact resume, which Flower itself does not have.

What crosses the wire each round: down, the global trainable state (`ArrayRecord`) and a small `ConfigRecord`
(round, client name and id, seed); up, the client's update `local - global` (`ArrayRecord`, same size) and a
`MetricRecord` (example count, mean local loss, local steps). Descriptors and data never leave a client.

Needs the `flower` extra: `pip install "peft-c2a[flower]"`.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'peft_c2a.flower needs Flower: install it with `pip install "peft-c2a[flower]"` (flwr[simulation]).'
    ) from error

from .client_app import make_client_app
from .protocol import CONFIG_KEY, METRICS_KEY, STATE_KEY, state_from_record, state_to_record
from .server_app import make_server_app
from .strategy import FederatedStrategy

__all__ = [
    "CONFIG_KEY",
    "METRICS_KEY",
    "STATE_KEY",
    "FederatedStrategy",
    "make_client_app",
    "make_server_app",
    "state_from_record",
    "state_to_record",
]
