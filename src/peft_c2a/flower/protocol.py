"""The wire protocol between `FederatedStrategy` and the nodes' `ClientApp`: every message key, written once, and an
encode / decode pair for each message.

| message | server -> node | node -> server |
|---|---|---|
| `query` | nothing | `NodeDescription`: the node's clients, their training and test example counts, its seed |
| `train` | the global state + an `Instruction` for one client | the client's status (+ its update and metrics) |
| `evaluate` | the global state + an `Instruction` for its evaluable clients | per client and pass: scores or an error |

Arrays travel under `STATE_KEY` ("arrays", the name Flower's own strategies use, so its tooling recognises them),
settings under `CONFIG_KEY`, training metrics under `METRICS_KEY`. Client-private tensors never travel (the node
keeps them, `client_app.py`), and neither does anything computed from a client's labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..federated.aggregation import state_nbytes
from ..federated.server import ClientReport

STATE_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
CLIENTS_KEY = "clients"
ERRORS_KEY = "errors"
# evaluation scores of a client travel as "{pass}/{client}": its own descriptor, or the uniform one (C2A only)
OWN_PASS = "own"
UNIFORM_PASS = "uniform"
EVALUATION_PASSES = (OWN_PASS, UNIFORM_PASS)

TensorDict = dict[str, torch.Tensor]


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An `ArrayRecord` of `state` (CPU copies; names and order kept)."""
    return ArrayRecord({name: tensor.detach().cpu() for name, tensor in state.items()})


def state_from_record(record: ArrayRecord) -> TensorDict:
    """The tensors of `record` as writable torch tensors (Flower hands out read-only numpy-backed ones)."""
    return {name: tensor.clone() for name, tensor in record.to_torch_state_dict().items()}


# ---- query ------------------------------------------------------------------------------------------------------


@dataclass
class NodeDescription:
    """A node's answer to `query`: its clients (parallel lists) and the seed it trains with.

    Both counts bound what the node may later claim: a train reply must report `num_examples` (a client's FedAvg
    weight) and an evaluation reply `num_test_examples` (its weight in the pooled global score: the predictions its
    scores count, `FederatedTrainer.count_scored_examples`) as announced here. A client without any is not
    evaluated.
    """

    names: list[str]
    num_examples: list[int]
    num_test_examples: list[int]
    seed: int

    @property
    def evaluable(self) -> list[bool]:
        return [count > 0 for count in self.num_test_examples]


def encode_query_reply(description: NodeDescription) -> RecordDict:
    return RecordDict(
        {
            CLIENTS_KEY: ConfigRecord(
                {
                    "names": list(description.names),
                    "num-examples": [int(count) for count in description.num_examples],
                    "num-test-examples": [int(count) for count in description.num_test_examples],
                    "seed": int(description.seed),
                }
            )
        }
    )


def decode_node_description(record: Mapping[str, Any]) -> NodeDescription:
    """A `NodeDescription` from a query reply's `CLIENTS_KEY` record. Raises `ValueError` if it is malformed."""
    try:
        names = [str(name) for name in record["names"]]
        counts = [int(count) for count in record["num-examples"]]
        test_counts = [int(count) for count in record["num-test-examples"]]
        seed = int(record["seed"])
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # OverflowError: int(inf)
        raise ValueError(f"malformed client description: {error!r}") from error
    if not len(names) == len(counts) == len(test_counts):
        raise ValueError("malformed client description: names and example counts differ in length")
    if any(count < 0 for count in test_counts):
        raise ValueError(f"malformed client description: negative test-example counts {test_counts}")
    return NodeDescription(names, counts, test_counts, seed)


def decode_query_reply(content: RecordDict) -> NodeDescription:
    return decode_node_description(content[CLIENTS_KEY])


def map_clients_to_nodes(
    descriptions: Mapping[int, Any], seed: int
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """`(client -> node, client -> announced training examples, evaluable client -> announced test examples)` from
    the nodes' query replies (node id -> `NodeDescription`, or its raw record).

    Raises `ValueError` for a node with another seed, a client held by two nodes, or a client announced with fewer
    than one example (its count weighs its update).
    """
    nodes: dict[str, int] = {}
    examples: dict[str, int] = {}
    test_examples: dict[str, int] = {}
    for node, raw in sorted(descriptions.items()):
        description = raw if isinstance(raw, NodeDescription) else decode_node_description(raw)
        if description.seed != seed:
            raise ValueError(f"Node {node} runs with seed {description.seed}, the server with {seed}.")
        for name, count, test_count in zip(
            description.names, description.num_examples, description.num_test_examples, strict=True
        ):
            if name in nodes:
                raise ValueError(f"Client {name!r} is held by two nodes ({nodes[name]} and {node}).")
            if count < 1:
                raise ValueError(
                    f"Node {node} announces {count} training examples for client {name!r}; a client needs at least "
                    "one (its count weighs its update)."
                )
            nodes[name], examples[name] = node, int(count)
            if test_count > 0:
                test_examples[name] = int(test_count)
    return nodes, examples, test_examples


# ---- train and evaluate instructions ----------------------------------------------------------------------------


@dataclass
class Instruction:
    """What a `train` or `evaluate` message asks of a node, besides the global state.

    Attributes:
        server_round: the round.
        seed, aggregation, proximal_mu: settings a node must share with the server (it refuses otherwise).
        clients: the client to train (one), or the clients to evaluate.
        client_ids: the server's id of each client (-1: the adapter has no client-id embedding).
        extra: the caller's own settings (`train_config` / `evaluate_config`), carried along.
        oldest_resume_round: the oldest round the server can still resume after (its oldest kept checkpoint, or the
            previous round when it keeps none): a node may delete the client-private copies older than the newest one
            up to that round. `None`: keep every copy.
    """

    server_round: int
    seed: int
    aggregation: str
    proximal_mu: Optional[float] = None
    clients: list[str] = field(default_factory=list)
    client_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    oldest_resume_round: Optional[int] = None


def _encode_settings(instruction: Instruction) -> ConfigRecord:
    settings = ConfigRecord(dict(instruction.extra))
    settings.update(
        {"server-round": instruction.server_round, "seed": instruction.seed, "aggregation": instruction.aggregation}
    )
    if instruction.proximal_mu is not None:
        settings["proximal-mu"] = float(instruction.proximal_mu)
    if instruction.oldest_resume_round is not None:
        settings["oldest-resume-round"] = int(instruction.oldest_resume_round)
    return settings


def _decode_settings(config: Mapping[str, Any]) -> Instruction:
    known = {"server-round", "seed", "aggregation", "proximal-mu", "oldest-resume-round"}
    known |= {"client", "client-id", "clients", "client-ids"}
    mu, oldest = config.get("proximal-mu"), config.get("oldest-resume-round")
    return Instruction(
        server_round=int(config["server-round"]),
        seed=int(config["seed"]),
        aggregation=str(config["aggregation"]),
        proximal_mu=None if mu is None else float(mu),
        extra={key: value for key, value in config.items() if key not in known},
        oldest_resume_round=None if oldest is None else int(oldest),
    )


def encode_train(state: ArrayRecord, instruction: Instruction) -> RecordDict:
    """A `train` message's content: `instruction.clients` holds the one client to train."""
    (client,) = instruction.clients
    settings = _encode_settings(instruction)
    settings.update({"client": client, "client-id": instruction.client_ids[0] if instruction.client_ids else -1})
    return RecordDict({STATE_KEY: state, CONFIG_KEY: settings})


def decode_train(content: RecordDict) -> tuple[TensorDict, Instruction]:
    config = content[CONFIG_KEY]
    instruction = _decode_settings(config)
    instruction.clients = [str(config["client"])]
    instruction.client_ids = [int(config.get("client-id", -1))]
    return state_from_record(content[STATE_KEY]), instruction


def encode_evaluate(state: ArrayRecord, instruction: Instruction) -> RecordDict:
    settings = _encode_settings(instruction)
    settings.update({"clients": list(instruction.clients), "client-ids": list(instruction.client_ids)})
    return RecordDict({STATE_KEY: state, CONFIG_KEY: settings})


def decode_evaluate(content: RecordDict) -> tuple[TensorDict, Instruction]:
    config = content[CONFIG_KEY]
    instruction = _decode_settings(config)
    instruction.clients = [str(name) for name in config["clients"]]
    instruction.client_ids = [int(client_id) for client_id in config["client-ids"]]
    if len(instruction.clients) != len(instruction.client_ids):
        raise ValueError("An evaluate message names a different number of clients and client ids.")
    return state_from_record(content[STATE_KEY]), instruction


# ---- replies ----------------------------------------------------------------------------------------------------


def encode_train_reply(report: ClientReport, update: Optional[Mapping[str, torch.Tensor]]) -> RecordDict:
    """A train reply: the client's status, and -- when training produced one -- its update and metrics. A non-finite
    update is sent all the same: the server screens every update and records the rejection."""
    status = ConfigRecord({"client": report.client, "status": report.status, "error": report.error or ""})
    if update is None:
        return RecordDict({CONFIG_KEY: status})
    metrics = MetricRecord(
        {
            "num-examples": int(report.num_examples),
            "train-loss": float(report.train_loss),
            "local-steps": int(report.local_steps),
        }
    )
    return RecordDict({STATE_KEY: state_to_record(update), METRICS_KEY: metrics, CONFIG_KEY: status})


def train_reply_client(content: RecordDict) -> Optional[str]:
    """The client a train reply is about, or `None` when it names none."""
    try:
        return str(content[CONFIG_KEY]["client"])
    except (KeyError, TypeError):
        return None


def decode_train_reply(content: RecordDict, bytes_down: int) -> tuple[ClientReport, Optional[TensorDict]]:
    """The report and update of a train reply that names its client (`train_reply_client`).

    A reply without an update is a `failed` report; one whose update or metrics cannot be read is `rejected` (a
    node's malformed reply is its failure, never the server's). Otherwise the report is `ok` as far as the wire goes,
    whatever status the node claims: whether the update is usable is for the server to judge.
    """
    status = content[CONFIG_KEY]
    report = ClientReport(str(status["client"]), "failed", bytes_down=bytes_down)
    if status.get("status") == "failed" or STATE_KEY not in content.array_records:
        report.error = str(status.get("error") or "no update sent")
        return report, None
    try:
        update = state_from_record(content[STATE_KEY])
        metrics = content[METRICS_KEY]
        report.num_examples = int(metrics["num-examples"])
        report.train_loss = float(metrics["train-loss"])
        report.local_steps = int(metrics["local-steps"])
    except Exception as error:  # anything malformed from a node is its failure, never the server's
        report.status, report.error = "rejected", f"malformed reply: {error!r}"
        return report, None
    report.status, report.bytes_up = "ok", state_nbytes(update)
    return report, update


def train_report_problem(report: ClientReport, announced_examples: int) -> Optional[str]:
    """Why a train reply's metrics cannot be true or used, or `None`: an example count other than the one the node
    announced at `query` (it would change the client's weight in the average), a non-finite loss, a negative number
    of local steps."""
    if report.num_examples != announced_examples:
        return (
            f"example count {report.num_examples} differs from the {announced_examples} the node announced (it would "
            "change the client's weight in the average)"
        )
    if not math.isfinite(report.train_loss):
        return f"non-finite training loss {report.train_loss}"
    if report.local_steps < 0:
        return f"negative local steps {report.local_steps}"
    return None


def encode_evaluate_reply(
    scores: Mapping[tuple[str, str], Mapping[str, float]], errors: Mapping[str, str]
) -> RecordDict:
    """An evaluate reply: `scores[(pass, client)]` for each pass in `EVALUATION_PASSES` that ran, and the clients
    whose evaluation raised."""
    reply = RecordDict()
    for (evaluation_pass, name), values in scores.items():
        reply[f"{evaluation_pass}/{name}"] = MetricRecord({key: float(value) for key, value in values.items()})
    if errors:
        reply[ERRORS_KEY] = ConfigRecord(dict(errors))
    return reply


def decode_evaluate_reply(
    content: RecordDict, test_examples: Mapping[str, int], node: int, passes: Sequence[str] = EVALUATION_PASSES
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """`({pass: {client: scores}}, {client: error})` of an evaluate reply, for the addressed clients only
    (`test_examples`: each of them -> the test examples its node announced at `query`; a node may only report on the
    clients it was asked about). Malformed scores count as that client's failure, and so do incomplete ones: a client
    must have every pass in `passes` (a model without a descriptor runs the own pass only), each over the announced
    number of examples, or it would count in one score and silently not in the other, or weigh more in the pooled
    global score than its data does."""
    addressed = test_examples
    scores: dict[str, dict[str, dict[str, float]]] = {evaluation_pass: {} for evaluation_pass in EVALUATION_PASSES}
    failed: dict[str, str] = {}
    if ERRORS_KEY in content.config_records:
        failed.update({str(k): str(v) for k, v in content[ERRORS_KEY].items() if k in addressed})
    for key, record in content.metric_records.items():
        evaluation_pass, _, name = key.partition("/")
        if evaluation_pass not in scores or name not in addressed:
            continue
        try:
            values = {str(k): float(v) for k, v in record.items()}
        except (TypeError, ValueError):
            failed[name] = f"malformed scores from node {node}"
            continue
        problem = _score_problem(values)
        if problem is not None:
            failed[name] = f"impossible scores from node {node}: {problem}"
            continue
        scores[evaluation_pass][name] = values
    for name in set().union(*(scores[evaluation_pass] for evaluation_pass in passes)) - set(failed):
        missing = [evaluation_pass for evaluation_pass in passes if name not in scores[evaluation_pass]]
        if missing:
            failed[name] = f"incomplete scores from node {node}: no {' or '.join(missing)} pass"
            continue
        counts = [scores[evaluation_pass][name].get("num_examples") for evaluation_pass in passes]
        if len(set(counts)) > 1:
            failed[name] = f"inconsistent scores from node {node}: the passes count {counts} examples"
        elif counts[0] != test_examples[name]:
            failed[name] = (
                f"inconsistent scores from node {node}: {counts[0]} examples scored, {test_examples[name]} announced"
            )
    for evaluation_pass in EVALUATION_PASSES:  # a client with a bad pass is not half-counted
        for name in failed:
            scores[evaluation_pass].pop(name, None)
    return scores, failed


def _score_problem(scores: Mapping[str, float]) -> Optional[str]:
    """Why a client's reported scores cannot be true (a share outside [0, 1], a negative or fractional example
    count, a negative or non-finite loss), or `None`."""
    for key, value in scores.items():
        if (key.endswith("accuracy") or key.endswith("f1")) and not 0.0 <= value <= 1.0:
            return f"{key}={value} outside [0, 1]"
        if key == "num_examples" and not (math.isfinite(value) and value >= 0 and value.is_integer()):
            return f"num_examples={value}"
        if key == "loss" and not (math.isfinite(value) and value >= 0):
            return f"loss={value}"
    return None
