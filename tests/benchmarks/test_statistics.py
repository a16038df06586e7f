"""The benchmark report's paired statistics: per-seed scores, C2A minus each method by seed, bootstrap intervals,
verdicts only where an interval excludes zero, and protocol v2's targets built on them."""

from __future__ import annotations

import pytest

from benchmarks.federated_bench.glance import glance_markdown
from benchmarks.federated_bench.report import paired_targets
from benchmarks.federated_bench.statistics import (
    PAIRED_SCORES,
    bootstrap_interval,
    client_percentile,
    paired_against,
    paired_difference,
    paired_markdown,
    per_seed_scores,
)


def run(seed: int, final: float, clients: dict[str, float], curve: list[float]) -> dict:
    return {
        "config": {"seed": seed},
        "derived": {
            "final": {
                "personalized_mean_accuracy": final,
                "global_accuracy": final - 0.1,
                "unseen_mean_accuracy": None,
            },
            "curves": {"personalized_mean_accuracy": [[i + 1, value] for i, value in enumerate(curve)]},
            "per_client_accuracy": clients,
        },
    }


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [0.1, 0.3, 0.2, 0.25, 0.15]
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values)
    assert low < sum(values) / len(values) < high
    assert min(values) <= low and high <= max(values)
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="No values"):
        bootstrap_interval([])


def test_paired_difference_pairs_common_seeds_and_claims_only_outside_zero():
    lead = paired_difference({0: 0.9, 1: 0.8, 2: 0.85, 3: 0.7, 4: 0.9}, {0: 0.7, 1: 0.75, 2: 0.6, 3: 0.6})
    assert lead["seeds"] == [0, 1, 2, 3] and lead["per_seed"] == pytest.approx([0.2, 0.05, 0.25, 0.1])
    assert lead["mean"] == pytest.approx(0.15) and lead["verdict"] == "lead"
    mixed = paired_difference({0: 0.9, 1: 0.5, 2: 0.7, 3: 0.6}, {0: 0.7, 1: 0.6, 2: 0.7, 3: 0.6})
    assert mixed["verdict"] == "no claim" and mixed["interval"][0] < 0 < mixed["interval"][1]
    assert paired_difference(dict.fromkeys(range(4), 0.1), {0: 0.3, 1: 0.5, 2: 0.4, 3: 0.2})["verdict"] == "loss"
    assert paired_difference({0: 0.1}, {1: 0.2}) is None
    # one to three paired seeds: the difference is reported, but no interval and no claim, however large it is
    for seeds in ([0], [0, 1], [0, 1, 2]):
        few = paired_difference({s: 0.9 for s in seeds}, {s: 0.1 for s in seeds})
        assert few["mean"] == pytest.approx(0.8) and few["interval"] is None and few["verdict"] == "too few seeds"


def test_per_seed_scores_and_the_10th_percentile_client():
    assert client_percentile({"a": 0.0, "b": 1.0, "c": 0.5, "d": None}) == pytest.approx(0.1)
    assert client_percentile({}) is None
    scores = per_seed_scores([run(3, 0.8, {"a": 1.0, "b": 0.0}, [0.2, 0.4, 0.6, 0.8])], tail_rounds=2)
    assert set(scores) == set(PAIRED_SCORES)
    assert scores["personalized_mean_accuracy"] == {3: 0.8}
    assert scores["personalized_mean_accuracy_tail"] == {3: pytest.approx(0.7)}
    assert scores["personalized_p10_accuracy"] == {3: pytest.approx(0.1)}
    assert scores["global_accuracy"] == {3: pytest.approx(0.7)}
    assert scores["unseen_mean_accuracy"] == {}  # missing values are left out, not zero


def test_paired_against_and_its_table():
    c2a = [run(seed, 0.9 - 0.1 * seed, {"a": 0.9 - 0.1 * seed}, [0.9 - 0.1 * seed]) for seed in range(4)]
    lora = [run(seed, 0.7 - 0.1 * seed, {"a": 0.5 - 0.1 * seed}, [0.7 - 0.1 * seed]) for seed in range(4)]
    rows = {
        "c2a": {"per_seed": per_seed_scores(c2a, 5)},
        "lora": {"per_seed": per_seed_scores(lora, 5)},
        "lora_three_seeds": {"per_seed": per_seed_scores(lora[:3], 5)},
        "local": {"per_seed": per_seed_scores([], 5)},
    }
    paired = paired_against(rows)
    assert set(paired) == {"lora", "lora_three_seeds", "local"}
    assert paired["lora"]["personalized_mean_accuracy"]["mean"] == pytest.approx(0.2)
    assert paired["lora"]["personalized_mean_accuracy"]["verdict"] == "lead"
    assert paired["local"]["global_accuracy"] is None
    table = paired_markdown(paired)
    assert any(line.startswith("| lora | 0,1,2,3 | +0.200 [+0.200, +0.200] lead") for line in table)
    assert any(line.startswith("| lora_three_seeds | 0,1,2 | +0.200 (too few seeds) |") for line in table)
    assert any(line.startswith("| local | – | – |") for line in table)
    assert paired_against({"lora": rows["lora"]}) == {} and paired_markdown({}) == []


def test_protocol_v2_targets_pass_only_on_a_lead_over_the_best_personalised_baseline():
    def row(mean):
        return {"personalized_mean_accuracy": {"mean": mean}}

    seeds = (0, 1, 2, 3)
    c2a = {"personalized_mean_accuracy": dict.fromkeys(seeds, 0.90), "global_accuracy": dict.fromkeys(seeds, 0.80)}
    rows = {"c2a": row(0.90), "prior_only": row(0.70), "lora_ft": row(0.88), "lora": row(0.60)}
    scenario = {
        "scenario": "label_skew",
        "alpha": 0.1,
        "methods": rows,
        "paired_vs_c2a": {
            # lora_ft, the best personalised baseline by its mean, is level with C2A; prior-only is far behind
            "lora_ft": {"personalized_mean_accuracy": paired_difference(c2a["personalized_mean_accuracy"],
                                                                        {0: 0.95, 1: 0.85, 2: 0.84, 3: 0.92})},
            "prior_only": {"personalized_mean_accuracy": paired_difference(c2a["personalized_mean_accuracy"],
                                                                           dict.fromkeys(seeds, 0.70))},
            "lora": {"global_accuracy": paired_difference(c2a["global_accuracy"], {0: 0.7, 1: 0.75, 2: 0.72, 3: 0.7})},
        },
    }  # fmt: skip
    personal, global_ = paired_targets(scenario)
    assert personal.startswith("FAIL: label_skew alpha=0.1: C2A minus lora_ft, personalised mean: +0.0")
    assert "(no claim; a pass needs a lead)" in personal and "MISSING lora_prior, local" in personal
    assert global_.startswith("PASS: label_skew alpha=0.1: C2A minus lora, global accuracy: +0.0825 [")
    # with two seeds there is no interval, so nothing passes; without the baselines' runs the lines say MISSING
    scenario["paired_vs_c2a"]["lora"]["global_accuracy"] = paired_difference({0: 0.9, 1: 0.9}, {0: 0.1, 1: 0.1})
    assert paired_targets(scenario)[1].startswith("FAIL") and "(too few seeds;" in paired_targets(scenario)[1]
    bare = {**scenario, "methods": {"c2a": row(0.9)}, "paired_vs_c2a": {}}
    assert [line.split(":")[0] for line in paired_targets(bare)] == ["MISSING", "MISSING"]
    assert paired_targets({**scenario, "methods": {}}) == []


def test_the_glance_table_puts_each_methods_paired_difference_beside_its_mean():
    def row(mean, seeds=(0, 1, 2), sent=100.0):
        stat = {"mean": mean}
        return {
            "seeds": list(seeds),
            "personalized_mean_accuracy": stat,
            "personalized_p10_accuracy": {"mean": None},
            "global_accuracy": stat,
            "unseen_mean_accuracy": stat,
            "bytes_up_per_client_per_round": {"mean": sent},
        }

    lead = paired_difference({0: 0.9, 1: 0.8, 2: 0.85, 3: 0.9}, {0: 0.7, 1: 0.75, 2: 0.6, 3: 0.62})
    summary = {
        "scenarios": [
            {
                "scenario": "label_skew",
                "alpha": 0.1,
                "methods": {"c2a": row(0.85), "lora": row(0.68, sent=1234.0), "head": row(None, seeds=())},
                "paired_vs_c2a": {"lora": {"personalized_mean_accuracy": lead}},
            },
            {"scenario": "language_skew", "alpha": 0.5, "methods": {"lora": row(0.5, seeds=())}},
        ]
    }
    lines = glance_markdown(summary)
    assert lines[0].startswith("**label_skew, alpha = 0.1**")
    table = [line for line in lines if line.startswith("| c2a") or line.startswith("| lora")]
    assert table[0] == "| c2a | 3 | 0.850 | – | 0.850 | 0.850 | 100 |"
    low, high = lead["interval"]
    assert table[1] == f"| lora | 3 | 0.680 (+0.195 [{low:+.3f}, {high:+.3f}] lead) | – | 0.680 | 0.680 | 1,234 |"
    # a method without final runs has no row, a scenario without any has no table
    assert not any(line.startswith("| head") for line in lines) and "language_skew" not in "".join(lines)
