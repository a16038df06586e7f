"""ClientApp: each SuperNode trains its own BBC News client with `FederatedTrainer`'s local training."""

from __future__ import annotations

import tempfile

import torch
from flwr.app import Context
from transformers import DataCollatorWithPadding

from peft_c2a.federated import FederatedTrainer
from peft_c2a.flower import make_client_app

from .task import build_model, federation_args, node_data


def node_trainer(context: Context) -> FederatedTrainer:
    """The node's trainer: its own client's data (the descriptor is computed here, from its own labels)."""
    torch.set_num_threads(int(context.run_config["threads-per-client"]))
    name, train, test, tokenizer = node_data(context)
    return FederatedTrainer(
        build_model(context.run_config),
        # a client writes nothing: results and checkpoints are the server's
        federation_args(context.run_config, output_dir=tempfile.gettempdir()),
        {name: train},
        {name: test} if test is not None else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


app = make_client_app(node_trainer)
