"""benchmarks/federated.py and benchmarks/federated_bench/: pure helpers, report logic and scheduling (fast), and the
--quick preset end to end (slow)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ALL_METHODS = ["c2a", "bottleneck", "lora", "fedprox_lora", "head", "local", "centralized", "prior_only"]
TRAINED_METHODS = ALL_METHODS[:-1]


# ---------------------------------------------------------------------------------------------------- pure helpers


def test_rounds_to_reach(proto):
    curve = [(1, 0.2), (2, 0.5), (3, 0.81), (4, 0.7), (5, 0.9)]
    assert proto.rounds_to_reach(curve, 0.8) == 3
    assert proto.rounds_to_reach(curve, 0.81) == 3  # reaching the threshold exactly counts
    assert proto.rounds_to_reach(list(reversed(curve)), 0.8) == 3  # order of the points does not matter
    assert proto.rounds_to_reach(curve, 0.95) is None  # never reached: None, not the last round
    assert proto.rounds_to_reach([(1, None), (2, math.nan), (3, 0.9)], 0.5) == 3
    assert proto.rounds_to_reach([], 0.1) is None


def test_mean_std(proto):
    stats = proto.mean_std([0.5, 0.7, 0.9])
    assert stats["mean"] == pytest.approx(0.7)
    assert stats["std"] == pytest.approx(0.2)  # sample std (ddof = 1)
    assert (stats["n"], stats["missing"]) == (3, 0)
    one = proto.mean_std([0.4])
    assert one["mean"] == pytest.approx(0.4) and one["std"] is None  # one seed has no spread
    holes = proto.mean_std([0.2, None, math.nan, 0.4])
    assert holes["mean"] == pytest.approx(0.3) and (holes["n"], holes["missing"]) == (2, 2)
    assert proto.mean_std([]) == {"mean": None, "std": None, "n": 0, "missing": 0}


def test_tail_mean_averages_the_last_rounds(proto):
    curve = [[3, 0.9], [1, 0.1], [2, 0.5], [4, None], [5, math.nan]]
    assert proto.tail_mean(curve, 3) == pytest.approx(0.9)  # rounds 3-5, missing values skipped
    assert proto.tail_mean(curve, 5) == pytest.approx(0.5)
    assert proto.tail_mean([[1, None]], 5) is None and proto.tail_mean([], 5) is None


def test_select_lr_argmax_and_deterministic_ties(proto):
    assert proto.select_lr({1e-4: 0.5, 3e-4: 0.7, 1e-3: 0.6}) == 3e-4
    # ties go to the smaller lr, whatever the order of the mapping
    assert proto.select_lr({3e-3: 0.8, 1e-4: 0.6, 1e-3: 0.8}) == 1e-3
    assert proto.select_lr({1e-3: 0.8, 3e-3: 0.8}) == 1e-3
    # with a margin, near-ties (single-seed noise) go to the smaller, more stable lr; clear wins still win
    assert proto.select_lr({3e-3: 0.5805, 1e-2: 0.562, 3e-2: 0.582}, margin=0.01) == 3e-3
    assert proto.select_lr({1e-3: 0.885, 3e-3: 0.900, 1e-2: 0.755}, margin=0.01) == 3e-3
    assert proto.select_lr({1e-3: 0.5, 3e-3: 0.2}, margin=proto.SELECTION_TIE_MARGIN) == 1e-3
    # a failed run (None / NaN criterion) never wins
    assert proto.select_lr({1e-4: 0.1, 1e-3: None, 3e-3: math.nan}) == 1e-4
    with pytest.raises(ValueError, match="No usable selection run"):
        proto.select_lr({1e-3: None, 3e-3: math.nan})


def test_grid_extends_past_an_edge_winner(proto):
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert proto.next_rate_beyond(grid, upward=True) == 0.1
    assert proto.next_rate_beyond([*grid, 0.1], upward=True) == 0.3  # not 0.30000000000000004
    assert proto.next_rate_beyond(grid, upward=False) == 3e-5
    assert proto.next_rate_beyond([3e-5, *grid], upward=False) == 1e-5
    scores = {1e-4: 0.3, 3e-4: 0.4, 1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7, 3e-2: 0.86}  # the head at alpha 0.5
    assert proto.resolve_selection(grid, scores) == (None, [*grid, 0.1], [0.1])  # waits for the run beyond the edge
    # within the tie margin of the edge winner: the edge rate stays chosen, now inside the grid
    assert proto.resolve_selection(grid, {**scores, 0.1: 0.865}) == (3e-2, [*grid, 0.1], [])
    # better beyond the edge: one more rate, then the cap (GRID_EXTENSIONS per side) ends the search
    assert proto.resolve_selection(grid, {**scores, 0.1: 0.9}) == (None, [*grid, 0.1, 0.3], [0.3])
    assert proto.GRID_EXTENSIONS == 2
    assert proto.resolve_selection(grid, {**scores, 0.1: 0.9, 0.3: 0.95}) == (0.3, [*grid, 0.1, 0.3], [])
    # downward alike; an interior winner adds nothing; a failed run beyond the edge never wins
    low = {1e-4: 0.9, 3e-4: 0.5, 1e-3: 0.4}
    assert proto.resolve_selection([1e-4, 3e-4, 1e-3], low)[2] == [3e-5]
    assert proto.resolve_selection([1e-4, 3e-4, 1e-3], {**low, 3e-5: None}) == (1e-4, [3e-5, 1e-4, 3e-4, 1e-3], [])
    assert proto.resolve_selection([1e-3, 3e-3, 1e-2], {1e-3: 0.5, 3e-3: 0.9, 1e-2: 0.1})[0] == 3e-3
    # missing grid rates first; a one-value grid needs no runs; every run failed: nothing chosen, nothing missing
    assert proto.resolve_selection([1e-3, 3e-3], {1e-3: 0.5}) == (None, [1e-3, 3e-3], [3e-3])
    assert proto.resolve_selection([3e-3], {}) == (3e-3, [3e-3], [])
    assert proto.resolve_selection([1e-3, 3e-3], {1e-3: None, 3e-3: math.nan}) == (None, [1e-3, 3e-3], [])


def test_carve_validation(federation):
    rng = np.random.default_rng(0)
    parts = [np.sort(rng.choice(1000, size=n, replace=False)) for n in (40, 8, 2, 1)]
    fits, vals = federation.carve_validation(parts, 0.15, seed=3)
    for part, fit, val in zip(parts, fits, vals, strict=True):
        assert not set(fit) & set(val)
        assert sorted(set(fit) | set(val)) == sorted(part)
        assert list(fit) == sorted(fit) and list(val) == sorted(val)
        assert len(fit) >= 1
    assert [len(v) for v in vals] == [6, 1, 1, 0]  # round(0.15 n), at least one, never the only example
    again = federation.carve_validation(parts, 0.15, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(vals, again[1], strict=True))
    with pytest.raises(ValueError):
        federation.carve_validation(parts, 1.0, seed=0)


def test_choose_unseen_clients():
    from peft_c2a.recipes import choose_unseen_clients

    names = [f"client-{i:02d}" for i in range(20)]
    unseen = choose_unseen_clients(names, 0.2, seed=0)
    assert len(unseen) == 4 and set(unseen) <= set(names)
    assert unseen == choose_unseen_clients(names, 0.2, seed=0)
    assert choose_unseen_clients(names, 0.0, seed=0) == []
    # grouped: round-robin over groups, so 4 unseen out of 5 languages x 4 clients come from 4 languages
    groups = [lang for lang in ("de", "en", "es", "fr", "ru") for _ in range(4)]
    names = [f"{g}-{i % 4}" for i, g in enumerate(groups)]
    unseen = choose_unseen_clients(names, 0.2, seed=1, groups=groups)
    assert len(unseen) == 4 and len({name.split("-")[0] for name in unseen}) == 4


def test_paths_and_numbers(proto):
    assert proto.fmt_number(0.1) == "0.1" and proto.fmt_number(5.0) == "5" and proto.fmt_number(3e-4) == "0.0003"
    spec = proto.RunSpec("label_skew", 0.1, "c2a", "final", 3e-4, 2, settings={})
    assert spec.relative_path() == Path("runs/label_skew/alpha-0.1/c2a/final/lr-0.0003/seed-2.json")


def test_atomic_write_leaves_no_temporaries(tmp_path, proto):
    target = tmp_path / "a" / "run.json"
    proto.atomic_write_json(target, {"x": np.float32(0.5), "complete": True})
    proto.atomic_write_json(target, {"x": 1, "complete": True})
    assert json.loads(target.read_text()) == {"x": 1, "complete": True}
    assert [p.name for p in target.parent.iterdir()] == ["run.json"]
    assert proto.read_run(target) is not None
    (tmp_path / "half.json").write_text('{"complete": fa')
    assert proto.read_run(tmp_path / "half.json") is None


def test_quick_preset_keeps_explicit_flags(bench):
    args = bench.parse_args(["--quick"])
    assert args.methods == ALL_METHODS and args.lrs == [3e-3] and args.seeds == [0] and args.num_rounds == 2
    args = bench.parse_args(["--quick", "--methods", "c2a", "lora", "--num_rounds", "3"])
    assert args.methods == ["c2a", "lora"] and args.num_rounds == 3 and args.num_clients == 8
    default = bench.parse_args([])
    assert (
        default.lrs == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
        and default.alphas == [0.1, 0.5, 5.0]
        and default.seeds == [0, 1, 2]
    )


def test_selection_over_the_last_rounds_and_settings_of_older_files(proto, worker, bench):
    history = [
        {"round": r, "eval_personalized_mean_accuracy": a, "local_steps": 5, "train_time": 1.0}
        for r, a in enumerate([0.2, 0.5, 0.6, 0.7, 0.95], start=1)
    ]
    assert worker.derive(history, "select")["criterion"]["value"] == pytest.approx(0.95)
    assert worker.derive(history, "select", selection_rounds=3)["criterion"]["value"] == pytest.approx(0.75)
    # a tie margin of 0 picks the best score; the default 1 point sends near-ties to the smaller lr
    scores = {1e-3: 0.78, 3e-3: 0.80, 1e-2: 0.805, 3e-2: 0.70}
    assert proto.resolve_selection(list(scores), scores)[0] == 3e-3
    assert proto.resolve_selection(list(scores), scores, margin=0.0)[0] == 1e-2
    # run files written before these settings existed were run with their defaults
    args = bench.parse_args(["--quick"])
    spec = bench.plan(args, "final")[0]
    old = {"config": {"settings": {k: v for k, v in spec.settings.items() if k not in proto.SETTING_DEFAULTS}}}
    assert proto.protocol_mismatch(old, spec) == {}
    spec.settings["selection_rounds"] = 3
    assert proto.protocol_mismatch(old, spec) == {"selection_rounds": (1, 3)}
    assert "last 3 rounds" in proto.selection_rule(spec.settings)


def test_model_free_methods_need_no_selection(bench):
    args = bench.parse_args(["--quick", "--methods", "prior_only", "c2a_no_logit", "--lrs", "0.001", "0.003"])
    selects = bench.plan(args, "select")
    assert {spec.method for spec in selects} == {"c2a_no_logit"} and len(selects) == 2
    finals = {spec.method: spec for spec in bench.plan(args, "final")}
    assert finals["prior_only"].lr_grid == [0.0] and finals["c2a_no_logit"].lr_grid == [0.001, 0.003]


# ---------------------------------------------------------------------------------------------------- report logic


def fake_run(method, seed, curve, worst, bytes_up, lr=1e-3, phase="final", grid=(1e-3,), step=0.1, criterion=None):
    """A minimal run document as `run_single` writes it."""
    return {
        "status": "ok",
        "error": None,
        "config": {
            "scenario": "label_skew",
            "alpha": 0.1,
            "method": method,
            "phase": phase,
            "lr": lr,
            "seed": seed,
            "lr_grid": list(grid),
            "settings": {"selection_seed": 0},
        },
        "environment": {"cpu_model": "cpu", "cpu_count": 2, "torch_threads": 2, "torch": "x"},
        "derived": {
            "final": {
                "personalized_mean_accuracy": curve[-1],
                "personalized_worst_accuracy": worst,
                "global_accuracy": curve[-1] - 0.1,
                "unseen_mean_accuracy": None,
            },
            "criterion": {"value": criterion},
            "curves": {
                "personalized_mean_accuracy": [[r + 1, v] for r, v in enumerate(curve)],
                "personalized_worst_accuracy": [[r + 1, worst] for r in range(len(curve))],
                "global_accuracy": [[r + 1, v - 0.1] for r, v in enumerate(curve)],
            },
            "per_client_accuracy": {"client-00": curve[-1]},
            "unseen_client_accuracy": {},
            "bytes_up_per_client_per_round": bytes_up,
            "trainable_params_no_head": 10,
            "trainable_params_with_head": 12,
            "step_time_s_median": step,
            "memory": {"peak_rss_mb": 800.0, "peak_increase_mb": 200.0},
            "wall_time_s": 60.0,
        },
    }


def test_aggregate_rounds_threshold_and_targets(reporting):
    runs = [
        fake_run("c2a", 0, [0.5, 0.86, 0.90], 0.60, 200, step=0.12),
        fake_run("c2a", 1, [0.5, 0.80, 0.90], 0.62, 200, step=0.12),
        fake_run("lora", 0, [0.4, 0.6, 0.80], 0.50, 300),
        fake_run("lora", 1, [0.4, 0.7, 0.82], 0.50, 300),
        fake_run("bottleneck", 0, [0.4, 0.6, 0.70], 0.40, 600, step=0.1),
        fake_run("centralized", 0, [0.99, 0.99, 0.99], 0.99, 0),  # an upper bound: not in the 95 % threshold
        # selection runs of local on a two-value grid: the final run at the losing lr must be ignored
        fake_run("local", 0, [0.3], 0.1, 0, lr=1e-3, phase="select", grid=(1e-3, 3e-3), criterion=0.6),
        fake_run("local", 0, [0.3], 0.1, 0, lr=3e-3, phase="select", grid=(1e-3, 3e-3), criterion=0.7),
        # 3e-3 won at the grid's top edge: the selection added 1e-2, which did worse
        fake_run("local", 0, [0.3], 0.1, 0, lr=1e-2, phase="select", grid=(1e-3, 3e-3), criterion=0.5),
        fake_run("local", 0, [0.5, 0.6, 0.7], 0.3, 0, lr=3e-3, grid=(1e-3, 3e-3)),
        fake_run("local", 0, [0.5, 0.6, 0.95], 0.3, 0, lr=1e-3, grid=(1e-3, 3e-3)),  # stale lr
    ]
    summary = reporting.aggregate(runs)
    rows = summary["scenarios"][0]["methods"]
    assert list(rows) == ["c2a", "bottleneck", "lora", "local", "centralized"]  # benchmark order
    assert rows["local"]["chosen_lr"] == 3e-3 and rows["local"]["stale_final_lrs"] == [1e-3]
    assert rows["local"]["lr_grid"] == [1e-3, 3e-3, 1e-2] and rows["local"]["selection_scores"]["0.01"] == 0.5
    assert rows["local"]["personalized_mean_accuracy"]["mean"] == pytest.approx(0.7)
    c2a = rows["c2a"]
    assert c2a["personalized_mean_accuracy"]["mean"] == pytest.approx(0.9)
    assert c2a["personalized_worst_accuracy"]["std"] == pytest.approx(np.std([0.6, 0.62], ddof=1))
    assert c2a["personalized_p10_accuracy"]["mean"] == pytest.approx(0.9)  # one client per run: its own score
    assert c2a["personalized_weighted_accuracy"]["n"] == 0  # the fake runs record no example-weighted mean
    # threshold: 95 % of the best non-upper-bound final personalised mean (C2A's 0.90), not centralized's 0.99
    assert c2a["rounds_threshold"] == pytest.approx(0.855)
    assert c2a["rounds_to_95"] == 3  # seed-mean curve 0.83 at round 2, 0.90 at round 3
    assert c2a["rounds_to_95_per_seed"] == [2, 3]
    assert rows["bottleneck"]["rounds_to_95"] is None
    assert c2a["step_time_vs_bottleneck"] == pytest.approx(1.2)

    summary.update({"command": "x", "environment": {"date_utc": "now"}, "hardware": [], "settings": {}})
    targets = reporting.check_targets(summary)
    assert targets[0].startswith("PASS") and "personalised mean" in targets[0]
    assert targets[1].startswith("PASS") and "worst-client" in targets[1]  # 0.61 >= 0.50 + 0.02
    assert targets[2].startswith("PASS") and "rounds" in targets[2]  # 3 vs not reached
    assert targets[3].startswith("PASS") and "bytes" in targets[3]
    # a missing baseline is named, never silently dropped
    assert "MISSING fedprox_lora, fedprox_lora_mu0.001, fedprox_lora_mu0.1, head" in targets[0]
    assert targets[-1] == "MISSING: language_skew: no results"
    summary["targets"] = targets
    text = reporting.markdown(summary)
    assert "| c2a | 0.001 | 0,1 |" in text and "stale lr" in text


def test_targets_fail_when_a_baseline_wins(reporting):
    runs = [
        fake_run("c2a", 0, [0.5, 0.7], 0.30, 400),
        fake_run("lora", 0, [0.6, 0.8], 0.29, 300),
    ]
    summary = reporting.aggregate(runs)
    targets = reporting.check_targets(summary)
    assert [line.split(":")[0] for line in targets[:4]] == ["FAIL", "FAIL", "FAIL", "FAIL"]


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_no_plots_for_a_scenario_with_only_select_runs(reporting, tmp_path):
    """An alpha whose selection is under way has no final runs yet: the report draws no (empty) figures for it and
    leaves its table row blank."""
    runs = [
        fake_run("c2a", 0, [0.5], 0.5, 200, lr=lr, phase="select", grid=(1e-3, 3e-3), criterion=score)
        for lr, score in ((1e-3, 0.5), (3e-3, 0.7), (1e-2, 0.4))
    ]
    summary = reporting.aggregate(runs)
    assert summary["scenarios"][0]["methods"]["c2a"]["chosen_lr"] == pytest.approx(3e-3)
    assert reporting.write_plots(summary, tmp_path / "plots") == []
    # its table row has no measured figures, and "rounds to 95%" is blank, not "not reached"
    summary.update({"command": "x", "environment": {"date_utc": "now"}, "hardware": [], "settings": {}})
    summary["targets"] = reporting.check_targets(summary)
    row = next(line for line in reporting.markdown(summary).splitlines() if line.startswith("| c2a | 0.003 |"))
    assert "not reached" not in row and row.count("| – |") >= 5


def test_report_follows_the_grid_extension(reporting):
    """The report applies the same rule as the runner: an edge winner waits for the rate beyond; past the cap the
    edge is flagged."""
    select = lambda lr, score: fake_run(  # noqa: E731
        "head", 0, [0.5], 0.5, 0, lr=lr, phase="select", grid=(1e-3, 3e-3), criterion=score
    )
    row = reporting.aggregate([select(1e-3, 0.5), select(3e-3, 0.7)])["scenarios"][0]["methods"]["head"]
    assert row["chosen_lr"] is None and row["lr_rule"] == "selection incomplete: missing lr [0.01]"
    runs = [select(1e-3, 0.5), select(3e-3, 0.7), select(1e-2, 0.8), select(3e-2, 0.9)]
    runs.append(fake_run("head", 0, [0.5, 0.9], 0.5, 0, lr=3e-2, grid=(1e-3, 3e-3)))
    summary = reporting.aggregate(runs)
    row = summary["scenarios"][0]["methods"]["head"]
    assert row["chosen_lr"] == 3e-2 and row["lr_grid"] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert row["personalized_mean_accuracy"]["mean"] == pytest.approx(0.9)
    summary.update({"command": "x", "environment": {"date_utc": "now"}, "hardware": [], "settings": {}})
    summary["targets"] = reporting.check_targets(summary)
    assert "head: the chosen lr 0.03 is at the edge of the grid after 2 extensions" in reporting.markdown(summary)


def test_parallel_runs_wait_for_their_selection_and_respect_jobs(bench, tmp_path, monkeypatch, proto):
    """`--jobs N`: at most N runs at a time; a method's final runs start only after all of its select runs, with the
    lr they chose; a second invocation runs nothing; a runner that raises is counted, not a hang.

    The worker is replaced by a stand-in that writes the run file `run_single` would (the real worker is exercised by
    the slow end-to-end test): the scheduling, not training, is under test here."""
    import threading
    import time

    # validation score by (method, lr) on the grid {1e-3, 3e-3}: c2a peaks at 1e-3, the bottom edge, so the selection
    # adds 3e-4, which does worse; head peaks at the top edge, does better at the added 1e-2 and again at 3e-2, where
    # the cap (2 rates per side) stops the search
    scores = {("c2a", 1e-3): 0.9, ("c2a", 3e-3): 0.5, ("head", 1e-3): 0.4, ("head", 3e-3): 0.7}
    scores |= {("c2a", 3e-4): 0.6, ("head", 1e-2): 0.8, ("head", 3e-2): 0.9}
    lock, running, events = threading.Lock(), [0], []

    def stand_in(spec, output_dir, quiet=False):
        with lock:
            running[0] += 1
            events.append(("start", spec.method, spec.phase, spec.lr, spec.seed, running[0]))
        time.sleep(0.05)
        document = {
            "status": "ok",
            "config": {**bench.asdict(spec), "settings": spec.settings},
            "derived": {"criterion": {"value": scores[spec.method, spec.lr]}} if spec.phase == "select" else {},
            "complete": True,
        }
        proto.atomic_write_json(output_dir / spec.relative_path(), document)
        with lock:
            running[0] -= 1
            events.append(("end", spec.method, spec.phase, spec.lr, spec.seed, running[0]))
        return True

    monkeypatch.setattr(bench, "run_in_subprocess", stand_in)
    argv = ["--quick", "--methods", "c2a", "head", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1"]
    argv += ["--jobs", "3", "--output_dir", str(tmp_path), "--no_report"]
    assert bench.main(argv) == 0

    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 2 * 2 + 1 + 2 + 2 * 2  # 2 methods x 2 select lrs, 1 + 2 added, 2 x 2 final seeds
    assert max(e[5] for e in starts) <= 3 and max(e[5] for e in starts) >= 2  # parallel, within --jobs
    selects = lambda method: [e[3] for e in starts if e[1:3] == (method, "select")]  # noqa: E731
    assert selects("c2a") == [1e-3, 3e-3, 3e-4] and selects("head") == [1e-3, 3e-3, 1e-2, 3e-2]
    for method, best in (("c2a", 1e-3), ("head", 3e-2)):
        last_select_end = max(i for i, e in enumerate(events) if e[:3] == ("end", method, "select"))
        finals = [(i, e) for i, e in enumerate(events) if e[:3] == ("start", method, "final")]
        assert sorted(e[4] for _, e in finals) == [0, 1]
        assert all(i > last_select_end and e[3] == pytest.approx(best) for i, e in finals)
        run = json.loads(
            (
                tmp_path / "runs/label_skew/alpha-0.1" / method / f"final/lr-{proto.fmt_number(best)}/seed-1.json"
            ).read_text()
        )
        assert run["config"]["selection"]["chosen_lr"] == pytest.approx(best)
        assert run["config"]["selection"]["grid"] == sorted(selects(method))

    # everything is done: a second invocation starts nothing
    events.clear()
    assert bench.main(argv) == 0 and events == []

    # a runner that raises (no temporary space, say) is one problem per run, and the benchmark still returns
    def broken(spec, output_dir, quiet=False):
        raise OSError("no space left")

    monkeypatch.setattr(bench, "run_in_subprocess", broken)
    other = tmp_path / "other"
    argv = ["--quick", "--methods", "c2a", "--lrs", "1e-3", "3e-3", "--jobs", "2", "--output_dir", str(other)]
    assert bench.execute(bench.parse_args(argv + ["--no_report"])) == 2 + 1  # 2 select runs fail, the final is blocked


def test_only_federated_c2a_runs_outside_selection_log_diagnostics(proto, worker):
    assert worker.logs_diagnostics(proto.RunSpec("label_skew", 0.1, "c2a_no_logit", "final", 3e-3, 0, {}))
    for method, phase in (("c2a", "select"), ("lora", "final"), ("local", "final")):
        assert not worker.logs_diagnostics(proto.RunSpec("label_skew", 0.1, method, phase, 3e-3, 0, {}))


@pytest.mark.slow
def test_quick_preset_end_to_end_and_resume(bench, tmp_path, monkeypatch, restore_threads):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--output_dir", str(out), "--no_report"]) == 0

    files = {}
    for method in TRAINED_METHODS:
        path = out / "runs" / "label_skew" / "alpha-0.1" / method / "final" / "lr-0.003" / "seed-0.json"
        assert path.is_file(), method
        files[method] = path
        run = json.loads(path.read_text())
        assert run["status"] == "ok" and run["complete"] is True
        assert [record["round"] for record in run["history"]] == [1, 2]  # evaluated every round
        accuracy = run["derived"]["final"]["personalized_mean_accuracy"]
        assert math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0
        assert run["config"]["settings"]["num_rounds"] == 2 and run["environment"]["cpu_count"]
        assert run["derived"]["memory"]["peak_rss_mb"] > 0 and run["derived"]["wall_time_s"] > 0
    derived = {m: json.loads(p.read_text())["derived"] for m, p in files.items()}
    assert derived["local"]["bytes_up_per_client_per_round"] == 0
    assert derived["centralized"]["bytes_up_per_client_per_round"] == 0
    assert 0 < derived["c2a"]["bytes_up_per_client_per_round"] < derived["lora"]["bytes_up_per_client_per_round"]
    assert derived["head"]["trainable_params_no_head"] == 0
    local = json.loads(files["local"].read_text())
    assert local["config"]["method_definition"]["peft_method"] == "bottleneck"
    centralized = json.loads(files["centralized"].read_text())
    assert centralized["config"]["local_max_steps"] == 4 * 2  # clients_per_round x local_steps
    # the prior-only guess trains nothing: no learning rate, one record, the majority-label accuracies
    files["prior_only"] = out / "runs" / "label_skew" / "alpha-0.1" / "prior_only" / "final" / "lr-0" / "seed-0.json"
    prior = json.loads(files["prior_only"].read_text())
    assert prior["status"] == "ok" and [record["round"] for record in prior["history"]] == [2]
    record = prior["history"][0]
    for name, scores in record["eval_clients"].items():
        counts = prior["config"]["clients"][name]["label_counts"]
        assert scores["accuracy"] == scores["prior_only_accuracy"], name
        assert 0.0 <= scores["accuracy"] <= 1.0 and sum(counts) > 0
    assert (
        prior["derived"]["bytes_up_per_client_per_round"] == 0 and prior["derived"]["trainable_params_with_head"] == 0
    )
    c2a = json.loads(files["c2a"].read_text())
    assert record["eval_personalized_mean_accuracy"] == pytest.approx(
        c2a["history"][-1]["eval_personalized_mean_prior_only_accuracy"]
    )  # the trained methods report the same guess beside their own scores
    # C2A runs log what the hypernetwork does, every evaluated round
    for record in c2a["history"]:
        assert 0 < record["diag_adapter_shift"] < 1 and -1 <= record["diag_generator_row_cosine_up"] <= 1
        assert -1 <= record["diag_descriptor_sensitivity"] <= 1

    # the report over the directory: one row per method, each with its chosen lr
    assert bench.main(["--report", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["scenarios"][0]["methods"]
    assert list(rows) == ALL_METHODS
    assert all(row["chosen_lr"] == pytest.approx(0.0 if m == "prior_only" else 3e-3) for m, row in rows.items())
    with (out / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["method"] for row in table] == ALL_METHODS
    assert all(
        float(row["chosen_lr"]) == pytest.approx(0.0 if row["method"] == "prior_only" else 3e-3) for row in table
    )
    assert any(line.startswith(("PASS", "FAIL")) and "bytes" in line for line in summary["targets"])
    assert "## label_skew, alpha = 0.1" in (out / "summary.md").read_text()
    for name in ("accuracy", "worst_client", "clients"):
        assert (out / "plots" / f"label_skew_alpha-0.1_{name}.png").stat().st_size > 0

    # a rerun skips every complete run: nothing is trained and no run file changes
    before = {m: (p.read_bytes(), p.stat().st_mtime_ns) for m, p in files.items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(bench, "run_in_subprocess", no_training)
    assert bench.main(["--quick", "--output_dir", str(out)]) == 0
    assert {m: (p.read_bytes(), p.stat().st_mtime_ns) for m, p in files.items()} == before
    # other protocol settings in the same directory are refused rather than mixed in
    with pytest.raises(SystemExit, match="other protocol settings"):
        bench.main(["--quick", "--output_dir", str(out), "--num_rounds", "3"])


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["select", "final"])
def test_language_skew_path_with_stand_in_data(
    bench, tmp_path, monkeypatch, restore_threads, phase, proto, worker, federation
):
    """The language-skew code path, with BBC News posing as a two-language corpus and MiniLM as the encoder (the real
    loaders live in benchmarks/support/)."""
    from datasets import DatasetDict

    from peft_c2a.assets import load_bbc_news, minilm_path

    seen = {}

    def load_bible_genres(languages, translations, test_fraction, seed, max_train_verses_per_language, **kwargs):
        seen.update(languages=languages, max_test=kwargs["max_test_verses_per_language"])
        data = load_bbc_news(seed=seed)
        parts = {}
        for split, size in (("train", 160), ("test", 40)):
            part = data[split].select(range(size))
            part = part.add_column("language", [languages[i % len(languages)] for i in range(size)])
            parts[split] = part.add_column("verse_id", list(range(size)))
        return DatasetDict(parts)

    monkeypatch.setattr(
        federation, "language_support", lambda: (load_bible_genres, lambda output_dir=None: minilm_path())
    )
    args = bench.parse_args(
        ["--quick", "--languages", "xx", "yy", "--clients_per_language", "3", "--num_rounds", "1"]
        + ["--clients_per_round", "2", "--local_steps", "1", "--max_seq_length", "16", "--output_dir", str(tmp_path)]
    )
    settings = bench.protocol_settings(args, "language_skew")
    assert settings["num_clients"] == 6
    spec = proto.RunSpec("language_skew", 0.5, "c2a", phase, 3e-3, 0, settings=settings, threads=2)
    run = worker.run_single(spec, tmp_path)
    assert seen == {"languages": ["xx", "yy"], "max_test": settings["bible_test_per_language"]}
    assert (tmp_path / spec.relative_path()).is_file()
    assert run["status"] == "ok"
    clients = run["config"]["clients"]
    assert sorted(clients) == ["xx-0", "xx-1", "xx-2", "yy-0", "yy-1", "yy-2"]
    assert all(info["group"] == name.split("-")[0] for name, info in clients.items())
    unseen = run["config"]["unseen_clients"]
    assert len(unseen) == 1  # round(0.2 x 6)
    accuracy = run["derived"]["final"]["personalized_mean_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    if phase == "select":
        assert run["derived"]["criterion"]["value"] == accuracy
        assert run["derived"]["final"]["global_accuracy"] is None  # no test set touched while selecting
    else:
        assert 0.0 <= run["derived"]["final"]["global_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("lora_prior", {"eval_logit_adjustment": 1.0, "personalization_steps": 0}),
        ("lora_ft", {"eval_logit_adjustment": 0.0, "personalization_steps": 5}),
        ("c2a_ft", {"eval_logit_adjustment": 0.0, "personalization_steps": 5}),
        ("lora", {"eval_logit_adjustment": 0.0, "personalization_steps": 0}),
        ("fedprox_lora", {"aggregation": "fedprox", "proximal_mu": 0.01}),
        ("fedprox_lora_mu0.1", {"aggregation": "fedprox", "proximal_mu": 0.1}),
        ("fedprox_lora_mu0.001", {"aggregation": "fedprox", "proximal_mu": 0.001}),
    ],
)
def test_protocol_v2_baselines_differ_only_in_their_trainer_options(bench, proto, worker, tmp_path, method, expected):
    settings = bench.protocol_settings(bench.parse_args(["--quick", "--output_dir", str(tmp_path)]), "label_skew")
    spec = proto.RunSpec("label_skew", 0.1, method, "final", 3e-3, 0, settings=settings)
    args = worker.training_arguments(spec, str(tmp_path))
    assert {key: getattr(args, key) for key in expected} == expected
    reference = worker.training_arguments(proto.RunSpec("label_skew", 0.1, "lora", "final", 3e-3, 0, settings), "x")
    assert (args.learning_rate, args.num_rounds, args.local_max_steps) == (
        reference.learning_rate,
        reference.num_rounds,
        reference.local_max_steps,
    )


def test_protocol_v2_settings_reach_the_run_and_older_files_keep_v1_values(bench, proto, worker, tmp_path):
    argv = ["--quick", "--output_dir", str(tmp_path), "--round_lr_scheduler", "cosine"]
    settings = bench.protocol_settings(bench.parse_args([*argv, "--test_examples_per_client", "20"]), "label_skew")
    assert (settings["round_lr_scheduler"], settings["test_examples_per_client"]) == ("cosine", 20)
    spec = proto.RunSpec("label_skew", 0.1, "c2a", "final", 3e-3, 0, settings=settings)
    assert worker.training_arguments(spec, str(tmp_path)).round_lr_scheduler == "cosine"
    # a run file written before the settings existed was run with constant rates and proportional test splits
    old = {k: v for k, v in settings.items() if k not in ("round_lr_scheduler", "test_examples_per_client")}
    v1 = bench.protocol_settings(bench.parse_args(["--quick", "--output_dir", str(tmp_path)]), "label_skew")
    assert proto.setting(old, "round_lr_scheduler") == v1["round_lr_scheduler"] == "constant"
    assert proto.setting(old, "test_examples_per_client") == v1["test_examples_per_client"] == 0


def test_precision_is_a_protocol_setting_that_reaches_the_trainer(bench, proto, worker, tmp_path):
    argv = ["--quick", "--output_dir", str(tmp_path)]
    fp32 = bench.protocol_settings(bench.parse_args(argv), "label_skew")
    bf16 = bench.protocol_settings(bench.parse_args([*argv, "--precision", "bf16"]), "label_skew")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    for settings, expected in ((fp32, False), (bf16, True)):
        spec = proto.RunSpec("label_skew", 0.1, "c2a", "final", 3e-3, 0, settings=settings)
        assert worker.training_arguments(spec, str(tmp_path)).bf16 is expected
    # files written before the setting existed ran in fp32: they match an fp32 spec and never a bf16 one
    old = {"config": {"settings": {k: v for k, v in fp32.items() if k != "precision"}}}
    assert proto.protocol_mismatch(old, proto.RunSpec("label_skew", 0.1, "c2a", "final", 3e-3, 0, fp32)) == {}
    assert proto.protocol_mismatch(old, proto.RunSpec("label_skew", 0.1, "c2a", "final", 3e-3, 0, bf16)) == {
        "precision": ("fp32", "bf16")
    }
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--precision", "fp16"])


def test_selection_over_two_seeds_averages_their_criteria(bench, proto, reporting, tmp_path):
    args = bench.parse_args(
        [
            "--quick",
            "--methods",
            "c2a",
            "--lrs",
            "0.001",
            "0.003",
            "--selection_seeds",
            "2",
            "--output_dir",
            str(tmp_path),
        ]
    )
    selects = bench.plan(args, "select")
    assert sorted((spec.lr, spec.seed) for spec in selects) == [(0.001, 0), (0.001, 1), (0.003, 0), (0.003, 1)]
    assert "mean over selection seeds 0, 1" in proto.selection_rule(selects[0].settings)
    # 3e-3 wins on seed 0 but loses on average; until seed 1 of a rate exists the selection waits for it
    criteria = {(0.001, 0): 0.70, (0.003, 0): 0.75, (0.001, 1): 0.80}
    for (lr, seed), value in criteria.items():
        spec = next(s for s in selects if (s.lr, s.seed) == (lr, seed))
        document = fake_run("c2a", seed, [value], 0.5, 1, lr=lr, phase="select", grid=(1e-3, 3e-3), criterion=value)
        document["config"]["settings"], document["complete"] = spec.settings, True
        proto.atomic_write_json(tmp_path / spec.relative_path(), document)
    final = bench.plan(args, "final")[0]
    chosen, record = bench.selection_state(tmp_path, final, final.lr_grid)
    assert chosen is None and record["missing"] == [0.003]
    spec = next(s for s in selects if (s.lr, s.seed) == (0.003, 1))
    document = fake_run("c2a", 1, [0.70], 0.5, 1, lr=0.003, phase="select", grid=(1e-3, 3e-3), criterion=0.70)
    document["config"]["settings"], document["complete"] = spec.settings, True
    proto.atomic_write_json(tmp_path / spec.relative_path(), document)
    chosen, record = bench.selection_state(tmp_path, final, final.lr_grid)
    assert record["scores"] == {"0.001": pytest.approx(0.75), "0.003": pytest.approx(0.725)}
    assert record["selection_seeds"] == [0, 1]
    assert chosen is None and record["missing"] == [3e-4]  # 1e-3 wins at the grid's edge: the rule looks beyond
    runs = [proto.read_run(path) for path in tmp_path.rglob("seed-*.json")]
    row = reporting.aggregate(runs)["scenarios"][0]["methods"]["c2a"]
    scored = {lr: value for lr, value in row["selection_scores"].items() if value is not None}
    assert scored == {"0.001": pytest.approx(0.75), "0.003": pytest.approx(0.725)}


def test_a_collapsed_round_is_found_and_fails_its_target(worker, reporting):
    history = [
        {
            "round": r,
            "eval_personalized_mean_accuracy": 0.5,
            "eval_global_predicted_classes": k,
            "local_steps": 5,
            "train_time": 1.0,
        }
        for r, k in enumerate([5, 1, 4], start=1)
    ]
    assert worker.derive(history, "final")["min_global_predicted_classes"] == 1
    assert worker.derive(history[:1], "final")["min_global_predicted_classes"] == 5
    runs = [fake_run("c2a", seed, [0.6, 0.7], 0.5, 10) for seed in (0, 1)] + [fake_run("lora", 0, [0.5], 0.4, 20)]
    runs[0]["derived"]["min_global_predicted_classes"], runs[1]["derived"]["min_global_predicted_classes"] = 3, 1
    summary = reporting.aggregate(runs)
    lines = reporting.scenario_targets(summary["scenarios"][0])
    assert "FAIL: label_skew alpha=0.1: no collapsed round: C2A's global model predicted >= 1 classes" in lines[-1]
    runs[1]["derived"]["min_global_predicted_classes"] = 2
    lines = reporting.scenario_targets(reporting.aggregate(runs)["scenarios"][0])
    assert lines[-1].startswith("PASS") and ">= 2 classes" in lines[-1]


def test_select_runs_evaluate_only_the_rounds_their_criterion_reads(bench, proto, worker, tmp_path):
    argv = ["--quick", "--output_dir", str(tmp_path), "--num_rounds", "15", "--selection_rounds", "3"]
    settings = bench.protocol_settings(bench.parse_args(argv), "label_skew")
    rounds = {}
    for phase in ("select", "final", "budget"):
        args = worker.training_arguments(proto.RunSpec("label_skew", 0.1, "c2a", phase, 3e-3, 0, settings), "x")
        rounds[phase] = [r for r in range(1, 16) if r >= args.eval_delay and args.eval_every_rounds == 1]
    assert rounds == {"select": [13, 14, 15], "final": list(range(1, 16)), "budget": list(range(1, 16))}
