"""Tests for the federated client partitioners: validity (disjoint, complete, sorted), determinism, skew, errors."""

from __future__ import annotations

import time

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_c2a.federated.client_splits import (
    client_datasets_from_partitions,
    grouped_partition_like,
    label_counts,
    partition_like,
    plot_label_heatmap,
    sample_like,
)
from peft_c2a.federated.partitioning import (
    dirichlet_label_partition,
    group_dirichlet_partition,
    iid_partition,
    quantity_skew_partition,
)

FAST = settings(max_examples=30, deadline=None)
ALPHAS = st.sampled_from([0.01, 0.1, 0.5, 1.0, 100.0])


def make_labels(num_examples: int = 1780, num_labels: int = 5, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_labels, num_examples)


def assert_valid_partition(parts: list[np.ndarray], num_examples: int, covered: np.ndarray | None = None) -> None:
    """Every part is a sorted int64 1-D array, parts are disjoint, and together they cover `covered` (default all)."""
    for part in parts:
        assert isinstance(part, np.ndarray)
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "not strictly increasing"
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert np.unique(joined).size == joined.size, "parts overlap"
    expected = np.arange(num_examples) if covered is None else np.sort(covered)
    np.testing.assert_array_equal(np.sort(joined), expected)


def same_partition(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def max_label_share(counts: np.ndarray) -> np.ndarray:
    sizes = counts.sum(axis=1)
    return counts.max(axis=1) / np.maximum(sizes, 1)


# --------------------------------------------------------------------------------------------------------------------
# iid_partition
# --------------------------------------------------------------------------------------------------------------------


@FAST
@given(num_examples=st.integers(0, 300), num_clients=st.integers(1, 25), seed=st.integers(0, 2**32 - 1))
def test_iid_partition_is_valid_and_balanced(num_examples, num_clients, seed):
    parts = iid_partition(num_examples, num_clients, seed=seed)
    assert len(parts) == num_clients
    assert_valid_partition(parts, num_examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same_partition(parts, iid_partition(num_examples, num_clients, seed=seed))


def test_iid_partition_seed_changes_split():
    assert not same_partition(iid_partition(100, 4, seed=0), iid_partition(100, 4, seed=1))


# --------------------------------------------------------------------------------------------------------------------
# dirichlet_label_partition
# --------------------------------------------------------------------------------------------------------------------


@FAST
@given(
    labels=st.lists(st.integers(0, 4), min_size=0, max_size=200),
    num_clients=st.integers(1, 12),
    alpha=ALPHAS,
    min_size=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_dirichlet_partition_is_valid(labels, num_clients, alpha, min_size, seed):
    if num_clients * min_size > len(labels):
        with pytest.raises(ValueError, match="min_size"):
            dirichlet_label_partition(labels, num_clients, alpha, min_size=min_size, seed=seed)
        return
    parts = dirichlet_label_partition(labels, num_clients, alpha, min_size=min_size, seed=seed, num_labels=5)
    assert len(parts) == num_clients
    assert_valid_partition(parts, len(labels))
    assert all(len(p) >= min_size for p in parts)
    # Label totals are preserved.
    counts = label_counts(parts, labels, 5)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(np.asarray(labels, dtype=np.int64), minlength=5))
    again = dirichlet_label_partition(labels, num_clients, alpha, min_size=min_size, seed=seed, num_labels=5)
    assert same_partition(parts, again)


def test_dirichlet_partition_seed_changes_split():
    labels = make_labels()
    a = dirichlet_label_partition(labels, 10, 0.5, seed=0)
    b = dirichlet_label_partition(labels, 10, 0.5, seed=1)
    assert same_partition(a, dirichlet_label_partition(labels, 10, 0.5, seed=0))
    assert not same_partition(a, b)


@pytest.mark.parametrize("min_size", [1, 20, 80])
def test_dirichlet_tiny_alpha_is_fast_skewed_and_respects_min_size(min_size):
    labels = make_labels(1780, 5)
    start = time.perf_counter()
    parts = dirichlet_label_partition(labels, 20, 0.01, min_size=min_size, seed=0)
    assert time.perf_counter() - start < 1.0
    assert_valid_partition(parts, labels.size)
    assert all(len(p) >= min_size for p in parts)
    counts = label_counts(parts, labels, 5)
    shares = max_label_share(counts)
    assert np.all(np.isfinite(shares))
    assert shares.mean() > 0.9


@pytest.mark.parametrize("alpha", [1e-4, 1e-300])
def test_dirichlet_underflowing_alpha_puts_each_label_on_one_client(alpha):
    # At these alphas every Gamma draw underflows to 0; the guard must give the whole label to one client, not NaN.
    labels = make_labels(500, 4)
    parts = dirichlet_label_partition(labels, 8, alpha, min_size=0, seed=3)
    assert_valid_partition(parts, labels.size)
    counts = label_counts(parts, labels, 4)
    assert np.all((counts > 0).sum(axis=0) == 1)


def test_dirichlet_large_alpha_is_near_uniform():
    labels = make_labels(1780, 5)
    parts = dirichlet_label_partition(labels, 20, 100.0, seed=0)
    assert_valid_partition(parts, labels.size)
    assert max_label_share(label_counts(parts, labels, 5)).mean() < 0.4


def test_dirichlet_accepts_datasets_column_and_list():
    labels = make_labels(300, 3)
    column = datasets.Dataset.from_dict({"label": labels.tolist()})["label"]
    expected = dirichlet_label_partition(labels, 5, 0.3, seed=7)
    assert same_partition(expected, dirichlet_label_partition(column, 5, 0.3, seed=7))
    assert same_partition(expected, dirichlet_label_partition(labels.tolist(), 5, 0.3, seed=7))


def test_dirichlet_num_labels_larger_than_observed():
    labels = make_labels(200, 3)
    parts = dirichlet_label_partition(labels, 4, 1.0, seed=0, num_labels=10)
    assert_valid_partition(parts, labels.size)


# --------------------------------------------------------------------------------------------------------------------
# group_dirichlet_partition
# --------------------------------------------------------------------------------------------------------------------


def make_grouped(num_examples: int = 1200, seed: int = 5) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, num_examples)
    groups = rng.choice(["en", "de", "fr", "zh"], num_examples).tolist()
    return labels, groups


def test_group_partition_one_group_per_client_and_names():
    labels, groups = make_grouped()
    parts, names = group_dirichlet_partition(labels, groups, clients_per_group=8, alpha=0.01, min_size=5, seed=0)
    assert names == [f"{g}-{i}" for g in ["de", "en", "fr", "zh"] for i in range(8)]
    assert_valid_partition(parts, labels.size)
    group_array = np.asarray(groups)
    for part, name in zip(parts, names, strict=True):
        assert len(part) >= 5
        assert set(group_array[part]) == {name.split("-")[0]}
    # Within-group Dirichlet: small alpha gives strongly label-skewed clients, large alpha near-global mixes.
    assert max_label_share(label_counts(parts, labels, 5)).mean() > 0.8
    uniform, _ = group_dirichlet_partition(labels, groups, clients_per_group=8, alpha=100.0, min_size=5, seed=0)
    assert max_label_share(label_counts(uniform, labels, 5)).mean() < 0.45
    again = group_dirichlet_partition(labels, groups, clients_per_group=8, alpha=0.01, min_size=5, seed=0)
    assert same_partition(parts, again[0]) and names == again[1]
    other = group_dirichlet_partition(labels, groups, clients_per_group=8, alpha=0.01, min_size=5, seed=1)
    assert not same_partition(parts, other[0])


def test_group_partition_is_per_group_dirichlet_independent_of_other_groups():
    labels, groups = make_grouped()
    parts, names = group_dirichlet_partition(labels, groups, 2, alpha=0.3, seed=11, num_labels=5)
    # Dropping a group leaves the other groups' clients unchanged (up to re-indexing), because each group's seed is
    # derived from the base seed and its own name.
    keep = np.flatnonzero(np.asarray(groups) != "fr")
    sub_parts, sub_names = group_dirichlet_partition(
        labels[keep], [groups[i] for i in keep], 2, alpha=0.3, seed=11, num_labels=5
    )
    full = dict(zip(names, parts, strict=True))
    assert sub_names == [n for n in names if not n.startswith("fr")]
    for name, part in zip(sub_names, sub_parts, strict=True):
        np.testing.assert_array_equal(keep[part], full[name])


@FAST
@given(
    data=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", 7])), min_size=0, max_size=150),
    clients_per_group=st.integers(1, 4),
    alpha=ALPHAS,
    seed=st.integers(0, 1000),
)
def test_group_partition_is_valid(data, clients_per_group, alpha, seed):
    labels = [label for label, _ in data]
    groups = [group for _, group in data]
    sizes = {g: groups.count(g) for g in set(groups)}
    if any(size < clients_per_group for size in sizes.values()):
        with pytest.raises(ValueError, match="min_size"):
            group_dirichlet_partition(labels, groups, clients_per_group, alpha, seed=seed, num_labels=4)
        return
    parts, names = group_dirichlet_partition(labels, groups, clients_per_group, alpha, seed=seed, num_labels=4)
    assert len(parts) == len(names) == clients_per_group * len(sizes)
    assert_valid_partition(parts, len(labels))
    assert all(len(p) >= 1 for p in parts)
    assert sorted({n.rsplit("-", 1)[0] for n in names}) == sorted(str(g) for g in sizes)


# --------------------------------------------------------------------------------------------------------------------
# quantity_skew_partition
# --------------------------------------------------------------------------------------------------------------------


@FAST
@given(
    num_examples=st.integers(0, 300),
    num_clients=st.integers(1, 15),
    alpha=ALPHAS,
    min_size=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_quantity_skew_is_valid(num_examples, num_clients, alpha, min_size, seed):
    if num_clients * min_size > num_examples:
        with pytest.raises(ValueError, match="min_size"):
            quantity_skew_partition(num_examples, num_clients, alpha, min_size=min_size, seed=seed)
        return
    parts = quantity_skew_partition(num_examples, num_clients, alpha, min_size=min_size, seed=seed)
    assert len(parts) == num_clients
    assert_valid_partition(parts, num_examples)
    assert all(len(p) >= min_size for p in parts)
    assert same_partition(
        parts, quantity_skew_partition(num_examples, num_clients, alpha, min_size=min_size, seed=seed)
    )


def test_quantity_skew_sizes_vary_but_label_mix_is_global():
    labels = make_labels(1780, 5)
    parts = quantity_skew_partition(labels.size, 20, 0.1, min_size=10, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10
    assert sizes.std() / sizes.mean() > 1.0
    even = np.array([len(p) for p in quantity_skew_partition(labels.size, 20, 100.0, seed=0)])
    assert even.std() / even.mean() < 0.2
    assert not same_partition(parts, quantity_skew_partition(labels.size, 20, 0.1, min_size=10, seed=1))
    # IID assignment: the size-weighted total-variation distance to the global mix is small.
    counts = label_counts(parts, labels, 5)
    global_mix = np.bincount(labels, minlength=5) / labels.size
    mixes = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    tv = 0.5 * np.abs(mixes - global_mix).sum(axis=1)
    assert np.average(tv, weights=sizes) < 0.1


# --------------------------------------------------------------------------------------------------------------------
# partition_like
# --------------------------------------------------------------------------------------------------------------------


def test_partition_like_follows_reference_mix():
    train = make_labels(1780, 5, seed=1)
    test = make_labels(900, 5, seed=2)
    train_parts = dirichlet_label_partition(train, 10, 0.1, seed=0)
    reference = label_counts(train_parts, train, 5)
    assert (reference == 0).any()  # the zero-share rule below is actually exercised
    parts = partition_like(test, reference, seed=0)
    assert len(parts) == 10
    assert_valid_partition(parts, test.size)  # every label is held by some client, so everything is assigned
    test_counts = label_counts(parts, test, 5)
    assert np.all(test_counts[reference == 0] == 0)
    # Largest-remainder rounding: each count is within one of its exact quota.
    quotas = reference / reference.sum(axis=0, keepdims=True) * np.bincount(test, minlength=5)
    assert np.all(np.abs(test_counts - quotas) < 1.0)
    assert same_partition(parts, partition_like(test, reference, seed=0))
    assert not same_partition(parts, partition_like(test, reference, seed=1))


def test_partition_like_leaves_unheld_labels_unassigned():
    test = np.array([0, 1, 2, 2, 1, 0, 2, 0, 1, 1])
    reference = np.array([[3, 0, 0], [1, 2, 0]])  # nobody holds label 2
    parts = partition_like(test, reference, seed=0)
    assert_valid_partition(parts, test.size, covered=np.flatnonzero(test != 2))
    counts = label_counts(parts, test, 3)
    np.testing.assert_array_equal(counts[:, 2], [0, 0])
    np.testing.assert_array_equal(counts[:, 1], [0, 4])
    np.testing.assert_array_equal(counts[:, 0], [2, 1])  # quotas 2.25 and 0.75


def test_partition_like_tiny_split_can_leave_clients_empty():
    parts = partition_like([0, 1], np.array([[100, 100], [1, 1], [1, 1]]), seed=0)
    assert [len(p) for p in parts] == [2, 0, 0]


@FAST
@given(
    test=st.lists(st.integers(0, 3), max_size=120),
    reference=st.lists(st.lists(st.integers(0, 20), min_size=4, max_size=4), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_partition_like_is_valid(test, reference, seed):
    reference = np.asarray(reference)
    parts = partition_like(test, reference, seed=seed)
    test_array = np.asarray(test, dtype=np.int64)
    held = reference.sum(axis=0) > 0
    assert_valid_partition(parts, len(test), covered=np.flatnonzero(held[test_array]) if test else None)
    counts = label_counts(parts, test, 4)
    assert np.all(counts[reference == 0] == 0)


# --------------------------------------------------------------------------------------------------------------------
# label_counts, client_datasets_from_partitions, plot_label_heatmap
# --------------------------------------------------------------------------------------------------------------------


def test_label_counts_matches_bincount():
    labels = make_labels(400, 6)
    parts = dirichlet_label_partition(labels, 7, 0.5, seed=2) + [np.zeros(0, dtype=np.int64)]
    counts = label_counts(parts, labels, 6)
    assert counts.shape == (8, 6) and counts.dtype == np.int64
    for row, part in zip(counts, parts, strict=True):
        np.testing.assert_array_equal(row, np.bincount(labels[part], minlength=6))


def test_client_datasets_from_partitions_names_and_sizes():
    labels = make_labels(60, 3)
    dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "idx": list(range(60))})
    parts = iid_partition(60, 4, seed=0)
    clients = client_datasets_from_partitions(dataset, parts)
    assert list(clients) == ["client-00", "client-01", "client-02", "client-03"]
    for (name, client), part in zip(clients.items(), parts, strict=True):
        assert len(client) == len(part), name
        assert list(client["idx"]) == part.tolist()
        assert list(client["label"]) == labels[part].tolist()
    many = client_datasets_from_partitions(dataset, iid_partition(60, 101, seed=0), prefix="c")
    assert list(many)[0] == "c-000" and list(many)[-1] == "c-100"
    named = client_datasets_from_partitions(dataset, parts[:2], names=["en-0", "en-1"])
    assert list(named) == ["en-0", "en-1"]


def test_plot_label_heatmap_writes_png(tmp_path):
    labels = make_labels(300, 4)
    counts = label_counts(dirichlet_label_partition(labels, 6, 0.3, seed=0), labels, 4)
    path = plot_label_heatmap(
        counts,
        tmp_path / "nested" / "dir" / "heatmap.png",
        client_names=[f"c{i}" for i in range(6)],
        label_names=["a", "b", "c", "d"],
        title="label skew",
    )
    assert path == tmp_path / "nested" / "dir" / "heatmap.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 0
    # A matrix too large to annotate still renders.
    big = plot_label_heatmap(np.random.default_rng(0).integers(0, 50, (40, 25)), str(tmp_path / "big.png"))
    assert big.read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------

LABELS = [0, 1, 2, 1, 0, 2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(labels=LABELS, num_clients=3, alpha=0.5, min_size=3), "min_size"),
        (dict(labels=LABELS, num_clients=2, alpha=0.0), "alpha"),
        (dict(labels=LABELS, num_clients=2, alpha=-1.0), "alpha"),
        (dict(labels=LABELS, num_clients=2, alpha=float("nan")), "alpha"),
        (dict(labels=LABELS, num_clients=2, alpha=float("inf")), "alpha"),
        (dict(labels=LABELS, num_clients=0, alpha=0.5), "num_clients"),
        (dict(labels=LABELS, num_clients=2, alpha=0.5, min_size=-1), "min_size"),
        (dict(labels=[0, -1, 2], num_clients=2, alpha=0.5), "non-negative"),
        (dict(labels=LABELS, num_clients=2, alpha=0.5, num_labels=2), "num_labels"),
        (dict(labels=[0.0, 1.0], num_clients=2, alpha=0.5), "integers"),
        (dict(labels=["a", "b"], num_clients=2, alpha=0.5), "integers"),
        (dict(labels=[[0, 1], [1, 0]], num_clients=2, alpha=0.5), "1-D"),
    ],
)
def test_dirichlet_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dirichlet_label_partition(**kwargs)


def test_group_partition_errors():
    with pytest.raises(ValueError, match="groups"):
        group_dirichlet_partition(LABELS, ["a"] * 7, 2, 0.5)
    with pytest.raises(ValueError, match="same name"):
        group_dirichlet_partition(LABELS, [1, "1"] * 4, 2, 0.5)
    with pytest.raises(ValueError, match=r"Group 'b'.*min_size"):
        group_dirichlet_partition(LABELS, ["a"] * 7 + ["b"], 2, 0.5)
    with pytest.raises(ValueError, match="clients_per_group"):
        group_dirichlet_partition(LABELS, ["a"] * 8, 0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        group_dirichlet_partition(LABELS, ["a"] * 8, 2, 0.0)


def test_other_partitioner_errors():
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(10, 0)
    with pytest.raises(ValueError, match="num_examples"):
        iid_partition(-1, 2)
    with pytest.raises(ValueError, match="min_size"):
        quantity_skew_partition(10, 4, 0.5, min_size=3)
    with pytest.raises(ValueError, match="alpha"):
        quantity_skew_partition(10, 4, float("nan"))
    with pytest.raises(ValueError, match="num_clients"):
        quantity_skew_partition(10, 0, 1.0)


@pytest.mark.parametrize(
    ("labels", "reference", "match"),
    [
        ([0, 1], np.array([1, 2]), "matrix"),
        ([0, 1], np.zeros((0, 2)), "matrix"),
        ([0, 1], np.array([[1, -1]]), "negative"),
        ([0, 1], np.array([[1.0, np.nan]]), "NaN"),
        ([0, 2], np.array([[1, 1]]), "num_labels"),
    ],
)
def test_partition_like_errors(labels, reference, match):
    with pytest.raises(ValueError, match=match):
        partition_like(labels, reference)


def test_utility_errors(tmp_path):
    dataset = datasets.Dataset.from_dict({"label": LABELS})
    parts = iid_partition(len(LABELS), 2)
    with pytest.raises(ValueError, match="names"):
        client_datasets_from_partitions(dataset, parts, names=["only-one"])
    with pytest.raises(ValueError, match="duplicate"):
        client_datasets_from_partitions(dataset, parts, names=["x", "x"])
    with pytest.raises(ValueError, match="outside"):
        label_counts([np.array([0, 99])], LABELS, 3)
    with pytest.raises(ValueError, match="num_labels"):
        label_counts(parts, LABELS, 2)
    with pytest.raises(ValueError, match="client_names"):
        plot_label_heatmap(np.ones((2, 3)), tmp_path / "x.png", client_names=["a"])
    with pytest.raises(ValueError, match="label_names"):
        plot_label_heatmap(np.ones((2, 3)), tmp_path / "x.png", label_names=["a"])
    with pytest.raises(ValueError, match="2-D"):
        plot_label_heatmap(np.ones(3), tmp_path / "x.png")


def test_grouped_partition_like_stays_inside_each_group():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2] * 5)
    groups = np.array(["a"] * 30 + ["b"] * 30)
    counts = np.array([[5, 0, 1], [0, 4, 4], [3, 3, 0], [1, 1, 1]])
    client_groups = ["a", "a", "b", "b"]
    parts = grouped_partition_like(labels, groups, counts, client_groups, seed=0)
    for part, group, count in zip(parts, client_groups, counts, strict=True):
        assert set(groups[part]) <= {group}
        assert set(labels[part]) <= set(np.flatnonzero(count))  # a client only gets labels it trains on
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))


def test_sample_like_gives_every_client_a_fixed_size_set_with_its_mix():
    labels = np.repeat([0, 1, 2], [50, 30, 4])
    reference = np.array([[90, 10, 0], [0, 1, 0], [1, 0, 99], [0, 0, 0]])
    parts = sample_like(labels, reference, size=20, seed=3)
    counts = [np.bincount(labels[part], minlength=3).tolist() for part in parts]
    assert counts[0] == [18, 2, 0]  # its 90 / 10 mix
    assert counts[1] == [0, 20, 0]  # a client with one training example still gets 20 test examples
    assert counts[2] == [0, 0, 4]  # capped at what the pool holds of its label
    assert counts[3] == [0, 0, 0]  # no labels, no examples
    assert all(len(set(part.tolist())) == len(part) for part in parts)  # no repeats within a client
    assert all(np.array_equal(a, b) for a, b in zip(parts, sample_like(labels, reference, 20, seed=3), strict=True))
    with pytest.raises(ValueError, match="size"):
        sample_like(labels, reference, size=0)
    with pytest.raises(ValueError, match="reference_counts"):
        sample_like(labels, -reference, size=5)
