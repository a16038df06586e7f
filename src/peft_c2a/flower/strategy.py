"""`FederatedStrategy`: the server side of a `FederatedTrainer` federation, as a Flower `Strategy`.

The algorithm is `FederatedTrainer`'s, held by the same `FederationServer` object (roster, sampling, aggregation and
the server step, history, checkpoints); this class only exchanges Flower messages with the nodes and screens what
comes back (`screen_update`). With the same clients, settings and seed, its global state equals the trainer's
(tested).

Flower's strategies address nodes; this one addresses *clients*: a `query` message asks every node which clients it
holds, and each round's seeded sample of clients is mapped onto their nodes. `start` adds what Flower lacks: a
checkpoint every `save_every_rounds` (`round-{k}/`, the same atomic, hashed format as `FederatedTrainer`) and exact
resume from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from peft import PeftModel
from torch import nn

from ..federated.aggregation import state_nbytes
from ..federated.arguments import FederatedTrainingArguments
from ..federated.checkpoint import oldest_kept_round
from ..federated.clients import descriptor_spec
from ..federated.metrics import evaluation_summary, headline, pooled_scores, scalar_items
from ..federated.rounds import (
    adapter_fingerprint,
    load_trainable_state,
    private_parameter_names,
    screen_update,
    shared_trainable_state,
)
from ..federated.server import ClientReport, FederationServer, ServerBacked
from .protocol import (
    EVALUATION_PASSES,
    OWN_PASS,
    UNIFORM_PASS,
    Instruction,
    decode_evaluate_reply,
    decode_query_reply,
    decode_train_reply,
    encode_evaluate,
    encode_train,
    map_clients_to_nodes,
    state_from_record,
    train_reply_client,
    train_report_problem,
)

# Flower's own logger: what the strategy says then shows in `flwr run --stream` / `flwr log` with Flower's lines
logger = logging.getLogger("flwr")

TensorDict = dict[str, torch.Tensor]
EvaluateFn = Callable[[int, ArrayRecord], Optional[MetricRecord]]


class FederatedStrategy(ServerBacked, Strategy):
    """A Flower strategy that runs `FederatedTrainer`'s algorithm over the clients held by Flower nodes.

    Args:
        model: the model being federated (its trainable parameters are the initial global state; the final and
            checkpointed global states are loaded into it, and PEFT models are saved with `save_pretrained`).
        args: the `FederatedTrainingArguments` of the federation: `num_rounds`, `clients_per_round` /
            `client_fraction`, `aggregation` and server optimizer settings, `min_clients_per_round`, `seed` /
            `client_sampling_seed`, `eval_every_rounds`, `save_every_rounds`, `save_total_limit`, `output_dir`.
            Local-training settings are the clients' (their own `args`). Only `federation_mode="federated"` runs on
            Flower.
        unseen_clients: client names that never train; they are evaluated with their own descriptors.
        min_available_nodes: nodes to wait for before asking which clients exist.
        node_wait_timeout: seconds to wait for them before failing.

    Raises:
        ValueError: `args.federation_mode` is not `"federated"`, or the model has no trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        args: FederatedTrainingArguments,
        unseen_clients: Sequence[str] = (),
        min_available_nodes: int = 1,
        node_wait_timeout: float = 600.0,
    ) -> None:
        if args.federation_mode != "federated":
            raise ValueError(
                f"Flower runs federated rounds; local-only and centralised baselines (federation_mode="
                f"{args.federation_mode!r}) run with FederatedTrainer."
            )
        self.model = model
        self.args = args
        self.min_available_nodes = min_available_nodes
        self.node_wait_timeout = node_wait_timeout
        # the shared state only: client-private tensors (C2A's client-id embedding) stay on the nodes
        self.private_keys = private_parameter_names(model)
        self.server = FederationServer(args, shared_trainable_state(model), engine="flower", log=logger)
        self.server.unseen_clients = sorted(unseen_clients)  # the roster is complete once the nodes have answered
        self.client_nodes: dict[str, int] = {}
        self.client_examples: dict[str, int] = {}
        self.client_ids: dict[str, int] = {}
        self.client_test_examples: dict[str, int] = {}  # clients with test data -> predictions their scores count
        self._round_start = 0.0
        self._round_record: dict[str, Any] = {}
        # the messages of the current round's phase and the clients they address: a reply names the message it
        # answers, which also attributes error replies (whose source may be the SuperLink, not the node)
        self._sent: list[tuple[Message, tuple[str, ...]]] = []

    # ---- Strategy interface ---------------------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the federation's settings."""
        args = self.args
        logger.info(
            "FederatedStrategy: %d rounds, %s aggregation, %s clients per round, seed %d, checkpoints every %s rounds "
            "in %s",
            args.num_rounds,
            args.aggregation,
            args.clients_per_round or f"{args.client_fraction:.0%} of the",
            args.seed,
            args.save_every_rounds or "no",
            args.output_dir,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One `train` message per client sampled for `server_round`, to the node that holds it."""
        sampled = self.server.sample(server_round)
        self._round_record = {"sampled_clients": sampled}
        self._sent = []
        # once per round, not per message: it reads the checkpoints' records; never past the previous round, since a
        # run resumed from an older checkpoint may still hold later ones
        args = self.args
        oldest = oldest_kept_round(args.output_dir, self.server.run_id) if args.save_every_rounds else server_round - 1
        oldest = min(oldest, server_round - 1)
        for name in sampled:
            instruction = replace(self._instruction(config, server_round, [name]), oldest_resume_round=oldest)
            message = Message(
                encode_train(arrays, instruction), message_type=MessageType.TRAIN, dst_node_id=self.client_nodes[name]
            )
            self._sent.append((message, (name,)))
        return [message for message, _ in self._sent]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Screen the updates, average the usable ones by example count and take the server optimizer step.

        Raises `RuntimeError` (leaving the global state and the last checkpoint untouched) when fewer than
        `min_clients_per_round` updates are usable.
        """
        sampled: list[str] = self._round_record["sampled_clients"]
        down = state_nbytes(self.global_state)
        reports: dict[str, ClientReport] = {}
        updates: dict[str, TensorDict] = {}
        errors: dict[str, str] = {}
        for reply in replies:
            addressed = self._addressed_clients(reply)
            if reply.has_error():
                errors.update(dict.fromkeys(addressed, f"error reply: {reply.error.reason}"))
                continue
            report, update = self._read_train_reply(reply, addressed, down)
            if report is None:
                continue
            reports[report.client] = report
            if update is not None:
                updates[report.client] = update
        for name in sampled:  # a client without a usable reply failed (its node's error, or no reply at all)
            if name not in reports:
                error = errors.get(name, "no reply before the timeout")
                reports[name] = ClientReport(name, "failed", bytes_down=down, error=error)
        ordered = [reports[name] for name in sampled]  # the trainer's summation order: sampled order
        accumulator = self.server.new_accumulator()
        weights = self.server.client_weights({name: self.client_examples[name] for name in sampled})
        for report in ordered:
            if report.ok:
                accumulator.add(self.server.bound_update(updates[report.client]), weights[report.client])
        self._round_record = self.server.finish_round(server_round, sampled, ordered, accumulator)
        self._round_record["train_time"] = time.time() - self._round_start
        for report in ordered:
            if not report.ok:
                logger.warning("Round %d: client %r %s: %s", server_round, report.client, report.status, report.error)
        return ArrayRecord(self.global_state), MetricRecord(
            {key: float(value) for key, value in scalar_items(self._round_record).items()}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On evaluation rounds, one `evaluate` message per node that holds clients with evaluation data."""
        if not self.server.is_evaluation_round(server_round):
            return []
        by_node: dict[int, list[str]] = {}
        for name in self.client_test_examples:  # the clients with test data
            by_node.setdefault(self.client_nodes[name], []).append(name)
        self._sent = []
        for node, names in sorted(by_node.items()):
            instruction = self._instruction(config, server_round, names)
            message = Message(encode_evaluate(arrays, instruction), message_type=MessageType.EVALUATE, dst_node_id=node)
            self._sent.append((message, tuple(names)))
        return [message for message, _ in self._sent]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Per-client scores summarised like `FederatedTrainer.evaluate_federation`.

        `eval_personalized_*`: training clients with their own descriptors; `eval_unseen_*`: unseen clients with theirs;
        `eval_global_{loss,accuracy}`: every evaluated client's data with the uniform descriptor, pooled (the union of
        the clients' test sets stands in for a server-side test set, which a federation usually does not have).
        Clients whose evaluation failed or never came back are listed under `eval_failed_clients` with the reason.
        """
        own: dict[str, dict[str, float]] = {}
        uniform: dict[str, dict[str, float]] = {}
        failed: dict[str, str] = {}
        for reply in replies:
            addressed = self._addressed_clients(reply)
            if reply.has_error():
                failed.update(dict.fromkeys(addressed, f"error reply: {reply.error.reason}"))
                continue
            passes = EVALUATION_PASSES if self.model_has_descriptor else (OWN_PASS,)
            announced = {name: self.client_test_examples[name] for name in addressed}
            scores, errors = decode_evaluate_reply(reply.content, announced, reply.metadata.src_node_id, passes)
            own.update(scores[OWN_PASS])
            uniform.update(scores[UNIFORM_PASS])
            failed.update(errors)
        expected = {name for _, names in self._sent for name in names}
        for name in sorted(expected - set(own) - set(failed)):
            failed[name] = "no reply before the timeout"
        if not self.model_has_descriptor:
            uniform = dict(own)  # without a descriptor both passes are the same; the node sends one
        seen = {name: scores for name, scores in own.items() if name not in self.unseen_clients}
        unseen = {name: scores for name, scores in own.items() if name in self.unseen_clients}
        out = evaluation_summary(pooled_scores(uniform), seen, unseen)
        if failed:
            out["eval_failed_clients"] = dict(sorted(failed.items()))
            logger.warning("Round %d: evaluation failed for %s", server_round, out["eval_failed_clients"])
        self._round_record.update(out)
        return MetricRecord({key: float(value) for key, value in scalar_items(out).items()})

    # ---- the round loop, with checkpoints ------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: Optional[ArrayRecord] = None,
        num_rounds: Optional[int] = None,
        timeout: float = 3600,
        train_config: Optional[ConfigRecord] = None,
        evaluate_config: Optional[ConfigRecord] = None,
        evaluate_fn: Optional[EvaluateFn] = None,
        resume_from_checkpoint: Union[str, bool, None] = None,
    ) -> Result:
        """Run the federation; like `Strategy.start`, plus checkpoints and resume.

        Args:
            grid: Flower's grid.
            initial_arrays: the initial global state (default: the model's trainable parameters).
            num_rounds: must equal `args.num_rounds` if given (the checkpoints and the evaluation schedule use it).
            timeout: seconds to wait for the replies of one round's messages.
            train_config / evaluate_config: extra settings sent with every train / evaluate message.
            evaluate_fn: optional server-side evaluation `(round, arrays) -> MetricRecord`, after every round.
            resume_from_checkpoint: `True` continues after the newest `output_dir/round-{k}/`, a path after that
                checkpoint; finished rounds are not redone.

        Returns:
            Flower's `Result`: the final global arrays and the per-round metrics. The full history (per-client
            scores included) is `self.history`, also written to `output_dir/history.json`.
        """
        args = self.args
        if num_rounds is not None and num_rounds != args.num_rounds:
            raise ValueError(f"num_rounds={num_rounds} differs from args.num_rounds={args.num_rounds}.")
        started = time.time()
        self.summary()
        self._discover_clients(grid)
        if initial_arrays is not None:
            initial = state_from_record(initial_arrays)
            reason = screen_update(initial, shared_trainable_state(self.model))
            if reason is not None:
                raise ValueError(f"`initial_arrays` does not fit the model: {reason}.")
            self.server.global_state = initial
        first_round = 1
        path = self.server.checkpoint_to_resume(resume_from_checkpoint)
        if path is not None:
            first_round = self.load_checkpoint(path) + 1
            started -= self.server.elapsed_before_resume()
        load_trainable_state(self.model, self.global_state, keep=self.private_keys)

        result = Result(arrays=ArrayRecord(self.global_state))
        for server_round in range(first_round, args.num_rounds + 1):
            self._round_start = time.time()
            arrays = ArrayRecord(self.global_state)
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, ConfigRecord(dict(train_config or {})), grid),
                timeout=timeout,
            )
            arrays, train_metrics = self.aggregate_train(server_round, replies)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = train_metrics
            messages = list(
                self.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config or {})), grid)
            )
            if messages:
                eval_start = time.time()
                evaluation = self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
                if evaluation is not None:
                    result.evaluate_metrics_clientapp[server_round] = evaluation
                self._round_record["eval_time"] = time.time() - eval_start
            if evaluate_fn is not None:
                server_metrics = evaluate_fn(server_round, arrays)
                if server_metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_metrics
                    self._round_record.update({f"server_{key}": value for key, value in server_metrics.items()})
            record = self._round_record
            record["round_time"] = time.time() - self._round_start
            record["wall_time"] = time.time() - started
            self.server.add_record(record)
            logger.info("Round %d: %s", server_round, headline(record))
            if self.server.is_checkpoint_round(server_round):
                self.save_checkpoint(server_round)
        load_trainable_state(self.model, self.global_state, keep=self.private_keys)
        return result

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self, round_index: int) -> Path:
        """Write `output_dir/round-{round_index}/` (atomic, hashed): global state, server optimizer, history,
        the run's identity, and the global adapter via `save_pretrained` for PEFT models."""
        load_trainable_state(self.model, self.global_state, keep=self.private_keys)
        write_extra = self.model.save_pretrained if isinstance(self.model, PeftModel) else None
        return self.server.save_checkpoint(round_index, write_extra=write_extra)

    def load_checkpoint(self, path: Union[str, Path]) -> int:
        """Restore the global state, server optimizer and history from a checkpoint; return its round.

        Raises `CheckpointError` if the checkpoint is corrupt, incomplete, or from a run with other clients, seeds or
        aggregation. Nothing is changed when it raises.
        """
        return self.server.restore(self.server.read_checkpoint(path))

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _discover_clients(self, grid: Grid) -> None:
        """Ask every node which clients it holds; map client names to nodes. Raises `ValueError` on conflicts."""
        deadline = time.time() + self.node_wait_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.time() > deadline:
                raise TimeoutError(
                    f"Only {len(node_ids)} of min_available_nodes={self.min_available_nodes} nodes connected within "
                    f"{self.node_wait_timeout:.0f} s."
                )
            time.sleep(0.5)
        queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in node_ids]
        replies = list(grid.send_and_receive(queries, timeout=self.node_wait_timeout))
        descriptions = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise RuntimeError(f"A node could not describe its clients: {reply.error.reason}")
            descriptions[node] = decode_query_reply(reply.content)
        silent = sorted(set(node_ids) - set(descriptions))
        if silent:
            raise RuntimeError(
                f"Nodes {silent} did not say which clients they hold within {self.node_wait_timeout:.0f} s."
            )
        self.register_clients(descriptions)

    def register_clients(self, descriptions: Mapping[int, Mapping[str, Any]]) -> None:
        """Record which node holds which clients, from the nodes' `query` replies (`node id -> description` with
        `names`, `num-examples`, `num-test-examples`, `seed`).

        Raises `ValueError` for a node with another seed, a client held by two nodes, unseen clients no node holds,
        no training client, more clients than a C2A adapter's client-id embedding has rows, or a
        `min_clients_per_round` above the clients sampled per round.
        """
        nodes, examples, test_examples = map_clients_to_nodes(descriptions, self.args.seed)
        spec = descriptor_spec(self.model)
        if spec is not None and spec.num_clients is not None and len(nodes) > spec.num_clients:
            raise ValueError(
                f"The C2A adapter embeds {spec.num_clients} client ids (`num_clients`), but the nodes hold "
                f"{len(nodes)} clients."
            )
        self.server.set_roster(nodes, self.unseen_clients, where="that no node holds")
        self.server.check_sampling()
        # what a checkpoint must also match: the adapter, and the clients' example counts (their data stays put)
        self.server.engine_identity = {
            "adapter": adapter_fingerprint(self.model),
            "client_examples": dict(sorted(examples.items())),
        }
        self.client_nodes, self.client_examples = nodes, examples
        self.client_test_examples = dict(sorted(test_examples.items()))
        # FederatedTrainer numbers clients by sorted name over all of them, unseen included
        self.client_ids = {name: index for index, name in enumerate(sorted(nodes))}
        logger.info("%d clients on %d nodes: %s", len(nodes), len(descriptions), sorted(nodes))

    @property
    def model_has_descriptor(self) -> bool:
        """Whether the model is a C2A model (its clients are also scored with the uniform descriptor)."""
        return descriptor_spec(self.model) is not None

    def _instruction(self, config: Mapping[str, Any], server_round: int, clients: Sequence[str]) -> Instruction:
        """What a train / evaluate message asks of a node: the round, the settings a node must share, the clients."""
        return Instruction(
            server_round=server_round,
            seed=self.args.seed,
            aggregation=self.args.aggregation,
            proximal_mu=float(self.args.proximal_mu) if self.args.aggregation == "fedprox" else None,
            clients=list(clients),
            client_ids=[self.client_ids.get(name, -1) for name in clients],
            extra=dict(config),
        )

    def _addressed_clients(self, reply: Message) -> tuple[str, ...]:
        """The clients of the message `reply` answers (by message id; by node when the grid sets no ids)."""
        answered = reply.metadata.reply_to_message_id
        for message, names in self._sent:
            if answered and message.metadata.message_id == answered:
                return names
        node = reply.metadata.src_node_id
        return tuple(name for message, names in self._sent if message.metadata.dst_node_id == node for name in names)

    def _read_train_reply(
        self, reply: Message, addressed: Sequence[str], down: int
    ) -> tuple[Optional[ClientReport], Optional[TensorDict]]:
        """The report and (usable) update of one train reply, or `(None, None)` for a reply about no client it was
        asked about. Everything in it is screened: the client must be the one addressed, the update must fit the
        global state and be finite, its metrics possible (`train_report_problem`)."""
        node = reply.metadata.src_node_id
        name = train_reply_client(reply.content)
        if name is None:
            logger.warning("A train reply from node %d names no client; ignored.", node)
            return None, None
        if name not in addressed:
            logger.warning("Node %d replied for client %r, which it was not asked to train; ignored.", node, name)
            return None, None
        report, update = decode_train_reply(reply.content, down)
        if update is None:
            return report, None
        reason = screen_update(update, self.global_state) or train_report_problem(report, self.client_examples[name])
        if reason is not None:
            report.status, report.error = "rejected", reason
            return report, None
        return report, update
