"""Protocol v2's budget (benchmarks/federated_bench/budget.py) and its preset: one epoch of the mean client per round,
rounds decided by probe curves before any selection run, and the runner and report that follow the decision."""

from __future__ import annotations

import importlib
import json

import pytest

from benchmarks.federated_bench.budget import (
    BUDGET_PHASE,
    PROBE_LR,
    PROBE_METHODS,
    PROBE_ROUNDS,
    budget_rounds,
    decide_budget,
    epoch_steps,
    plateau_round,
    probe_specs,
    resolve_local_steps,
    trailing_means,
)
from benchmarks.federated_bench.protocol import RunSpec, atomic_write_json


def curve(values: list[float]) -> list[list[float]]:
    return [[i + 1, value] for i, value in enumerate(values)]


def probe_document(values: list[float], status: str = "ok") -> dict:
    return {"status": status, "derived": {"curves": {"personalized_mean_accuracy": curve(values)}}, "complete": True}


RISING_THEN_FLAT = [0.1 * r for r in range(1, 11)] + [1.0] * 10  # 1.0 from round 10 on


def test_epoch_steps_are_one_epoch_of_the_mean_client():
    assert epoch_steps([10, 20, 33], 16) == 2  # mean 21 -> ceil(21 / 16)
    assert epoch_steps([250, 250, 251, 249], 16) == 16
    assert epoch_steps([3], 16) == 1
    assert resolve_local_steps({"local_steps": "epoch", "batch_size": 8}, [8, 24]) == 2
    assert resolve_local_steps({"local_steps": 5, "batch_size": 8}, [800]) == 5
    with pytest.raises(ValueError, match="training clients"):
        epoch_steps([], 16)


def test_plateau_is_the_first_window_within_the_tolerance_of_the_best():
    means = trailing_means(curve(RISING_THEN_FLAT))
    assert means[0] == (5, pytest.approx(0.3)) and len(means) == 16
    # the window ending at round 14 is all 1.0; the one ending at 13 averages 0.98, within 0.03 but not 0.01
    assert plateau_round(curve(RISING_THEN_FLAT)) == 14
    assert plateau_round(curve(RISING_THEN_FLAT), tolerance=0.03) == 13
    assert plateau_round(curve([0.5, None, 0.6])) is None  # shorter than a window (None values are skipped)
    # a noisy plateau: a late lucky spike does not move the plateau past the first window within the tolerance
    noisy = [0.5, 0.7, 0.8, 0.85, 0.9, 0.9, 0.91, 0.9, 0.9, 0.9, 0.9, 0.95]
    assert plateau_round(curve(noisy)) == 9


def test_budget_rounds_round_up_and_keep_a_floor():
    assert budget_rounds([12, 23]) == 25
    assert budget_rounds([3]) == 15
    assert budget_rounds([30]) == 30
    with pytest.raises(ValueError):
        budget_rounds([])


def test_decide_budget_waits_for_every_probe_and_flags_a_short_probe():
    rounds, record = decide_budget({"c2a": probe_document(RISING_THEN_FLAT), "lora": None})
    assert rounds is None and record["missing"] == ["lora"]
    rounds, record = decide_budget({"c2a": probe_document(RISING_THEN_FLAT), "lora": probe_document([], "failed")})
    assert rounds is None and record["failed"] == ["lora"]
    still_rising = [0.02 * r for r in range(1, 31)]
    rounds, record = decide_budget({"c2a": probe_document(RISING_THEN_FLAT), "lora": probe_document(still_rising)})
    assert record["plateau_rounds"] == {"c2a": 14, "lora": 30}
    assert record["best_window_is_last"] == {"c2a": False, "lora": True}
    assert rounds == record["num_rounds"] == 30


def template(settings: dict) -> RunSpec:
    return RunSpec("label_skew", 0.1, "c2a", "select", 1e-3, 0, settings, lr_grid=[1e-3, 3e-3])


def test_probes_run_the_probe_methods_on_the_selection_seed_at_a_constant_rate():
    settings = {"num_rounds": "plateau", "round_lr_scheduler": "cosine", "selection_seed": 7, "local_steps": "epoch"}
    probes = probe_specs(template(settings))
    assert [probe.method for probe in probes] == list(PROBE_METHODS)
    for probe in probes:
        assert (probe.phase, probe.lr, probe.seed, probe.lr_grid) == (BUDGET_PHASE, PROBE_LR, 7, [PROBE_LR])
        assert probe.settings == {**settings, "num_rounds": PROBE_ROUNDS, "round_lr_scheduler": "constant"}
        assert probe.relative_path().parts[-3:] == ("budget", "lr-0.003", "seed-7.json")
    assert settings["num_rounds"] == "plateau"  # the template's settings are not modified


def test_protocol_v2_preset_is_frozen_and_explicit_flags_still_win(bench):
    arguments = importlib.import_module("benchmarks.federated_bench.arguments")
    args = bench.parse_args(["--protocol", "v2"])
    assert (args.num_rounds, args.local_steps) == ("plateau", "epoch")
    assert (args.selection_seeds, args.selection_rounds, args.selection_tie_margin) == (2, 5, 0.0)
    assert (args.round_lr_scheduler, args.test_examples_per_client, args.precision) == ("cosine", 20, "bf16")
    assert args.seeds == [0, 1, 2, 3, 4] and args.lrs == [1e-3, 3e-3, 1e-2]
    assert args.methods == list(arguments.PROTOCOL_V2_METHODS) and args.output_dir.endswith("federated_v2")
    for method in ("prior_only", "lora_prior", "lora_ft", "c2a_ft", "centralized_lora", "fedprox_lora_mu0.1"):
        assert method in args.methods
    args = bench.parse_args(["--protocol", "v2", "--num_rounds", "30", "--scenarios", "label_skew"])
    assert args.num_rounds == 30 and args.scenarios == ["label_skew"] and args.local_steps == "epoch"
    assert bench.parse_args([]).num_rounds == 15  # without the preset, v1's defaults
    for argv in (["--quick", "--protocol", "v2"], ["--num_rounds", "0"], ["--local_steps", "many"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_runs_wait_for_the_budget_probes_then_take_their_rounds(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--protocol", "v2", "--scenarios", "label_skew", "--alphas", "0.1", "--output_dir", str(out)]
    args = bench.parse_args([*argv, "--methods", "c2a", "prior_only"])
    probes = bench.plan(args, BUDGET_PHASE)
    assert [(p.method, p.settings["num_rounds"]) for p in probes] == [(m, PROBE_ROUNDS) for m in PROBE_METHODS]
    assert bench.plan(bench.parse_args([*argv, "--num_rounds", "20"]), BUDGET_PHASE) == []  # rounds given: no probe

    select = bench.plan(args, "select")[0]
    assert bench.prepare(select, out, args) == (False, 1)
    assert "budget probes missing ['c2a', 'lora']" in capsys.readouterr().out

    atomic_write_json(out / probes[0].relative_path(), probe_document(RISING_THEN_FLAT))
    atomic_write_json(out / probes[1].relative_path(), probe_document([0.5] * 6 + [0.9] * 20))
    select = bench.plan(args, "select")[0]
    assert bench.prepare(select, out, args) == (True, 0)
    assert select.settings["num_rounds"] == 15  # plateaus at 14 and 11 -> 15
    assert select.budget["plateau_rounds"] == {"c2a": 14, "lora": 11} and select.budget["num_rounds"] == 15
    final = next(spec for spec in bench.plan(args, "final") if spec.method == "prior_only")
    assert bench.prepare(final, out, args) == (True, 0) and final.settings["num_rounds"] == 15


def test_the_report_states_the_budget(reporting):
    probes = []
    for method, values in zip(PROBE_METHODS, (RISING_THEN_FLAT, [0.02 * r for r in range(1, 31)]), strict=True):
        document = probe_document(values)
        document["config"] = {"scenario": "language_skew", "alpha": 0.5, "method": method, "phase": BUDGET_PHASE}
        probes.append(document)
    summary = reporting.aggregate(probes)
    (scenario,) = summary["scenarios"]
    assert scenario["methods"] == {} and scenario["budget"]["num_rounds"] == 30
    render = importlib.import_module("benchmarks.federated_bench.render")
    line = render.budget_line(scenario["budget"])
    assert line.startswith("Budget: **30 rounds**; plateau of the probes: c2a round 14, lora round 30 (best window")
    assert json.loads(json.dumps(scenario["budget"]))["plateau_rounds"] == {"c2a": 14, "lora": 30}


def test_resolved_local_steps_reach_the_trainer(bench, worker):
    settings = bench.protocol_settings(bench.parse_args(["--quick", "--local_steps", "epoch"]), "label_skew")
    spec = RunSpec("label_skew", 0.1, "centralized", "final", 3e-3, 0, settings)
    assert worker.training_arguments(spec, "x", local_steps=3).local_max_steps == 3 * settings["clients_per_round"]
    with pytest.raises(ValueError):
        worker.training_arguments(spec, "x")  # "epoch" needs the federation's clients to resolve


@pytest.mark.slow
def test_budget_probes_end_to_end(bench, tmp_path, monkeypatch):
    """The quick preset under v2's budget: real probes (shortened), then a final run at the rounds they decided."""
    budget = importlib.import_module("benchmarks.federated_bench.budget")
    window = 2  # the rule shortened so that probes of 3 rounds have a plateau to find
    monkeypatch.setattr(budget, "PLATEAU_WINDOW", window)
    monkeypatch.setattr(budget, "PROBE_ROUNDS", window + 1)
    monkeypatch.setattr(budget, "MIN_ROUNDS", 1)
    monkeypatch.setattr(budget, "ROUND_MULTIPLE", 1)
    out = tmp_path / "bench"
    argv = ["--quick", "--num_rounds", "plateau", "--local_steps", "epoch", "--methods", "c2a", "prior_only"]
    argv += ["--max_train_examples", "240", "--max_test_examples", "80"]
    assert bench.main([*argv, "--output_dir", str(out), "--no_report"]) == 0

    alpha = out / "runs" / "label_skew" / "alpha-0.1"
    plateaus = {}
    for method in PROBE_METHODS:
        probe = json.loads((alpha / method / "budget" / "lr-0.003" / "seed-0.json").read_text())
        assert probe["status"] == "ok" and [r["round"] for r in probe["history"]] == [1, 2, 3]
        assert probe["config"]["settings"]["round_lr_scheduler"] == "constant"
        assert "eval_global_accuracy" not in probe["history"][-1]  # validation data only, no test set
        plateaus[method] = plateau_round(probe["derived"]["curves"]["personalized_mean_accuracy"], window)
    final = json.loads((alpha / "c2a" / "final" / "lr-0.003" / "seed-0.json").read_text())
    assert final["config"]["settings"]["num_rounds"] == max(plateaus.values()) == len(final["history"])
    assert final["config"]["budget"]["plateau_rounds"] == plateaus
    training = [c for c, info in final["config"]["clients"].items() if not info["unseen"]]
    sizes = [final["config"]["clients"][c]["num_train"] for c in training]
    assert final["config"]["local_max_steps"] == epoch_steps(sizes, 16) > 1
    prior = json.loads((alpha / "prior_only" / "final" / "lr-0" / "seed-0.json").read_text())
    assert prior["config"]["settings"]["num_rounds"] == final["config"]["settings"]["num_rounds"]

    assert bench.main(["--report", "--output_dir", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert f"Budget: **{max(plateaus.values())} rounds**" in text
