"""The Flower `ServerApp`: run a `FederatedStrategy`, then save the final global adapter."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from .strategy import FederatedStrategy

logger = logging.getLogger("flwr")  # shows in `flwr run --stream` / `flwr log`

StrategyFactory = Callable[[Context], FederatedStrategy]


def make_server_app(strategy_fn: StrategyFactory, timeout: float = 3600.0) -> ServerApp:
    """A `ServerApp` that runs the strategy built by `strategy_fn(context)` for `args.num_rounds` rounds.

    `timeout` is how long each round's training (and evaluation) waits for replies, in seconds; a client whose
    reply has not come by then counts as failed.

    `args.resume_from_checkpoint` (`"true"` or a checkpoint path) continues an interrupted federation. At the end the
    global state is in the strategy's model; a PEFT model is saved to `args.output_dir` with `save_pretrained`, so
    `PeftModel.from_pretrained(base, output_dir)` loads the federated adapter.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = strategy_fn(context)
        if not isinstance(strategy, FederatedStrategy):
            raise TypeError(f"`strategy_fn` must return a FederatedStrategy, got {type(strategy).__name__}.")
        strategy.start(grid, timeout=timeout, resume_from_checkpoint=strategy.args.resume_from_checkpoint)
        if isinstance(strategy.model, PeftModel):
            strategy.model.save_pretrained(strategy.args.output_dir)
            logger.info("Saved the federated adapter to %s.", strategy.args.output_dir)

    return app
