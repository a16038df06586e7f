"""Deterministic client partitions of a dataset for simulated federated learning over non-IID clients.

C2A exists because federated clients do not see the same data: their label mixes differ (label skew), their sizes
differ (quantity skew), and in multilingual benchmarks each client speaks a single language. Experiments therefore
need reproducible ways to carve one centralised dataset into such clients. This module provides the usual recipes:

* `iid_partition`: the homogeneous baseline.
* `dirichlet_label_partition`: the classic label-skew split (per label, client shares ~ Dirichlet(alpha)). Small
  alpha gives clients dominated by one or two labels; large alpha approaches IID.
* `group_dirichlet_partition`: the C2A paper's multilingual split: each group (e.g. language) gets its own clients,
  and inside each group the labels are split with a Dirichlet label partition.
* `quantity_skew_partition`: client sizes ~ Dirichlet(alpha), examples drawn IID, so only the sizes differ.

A partition is a list with one sorted, disjoint `np.int64` index array per client. Every function is deterministic
given `seed`: all randomness comes from `np.random.default_rng(seed)` (never numpy's global RNG), so the same call
returns the same split on every machine and run. Minimum client sizes are enforced by a deterministic repair step
rather than by re-sampling until the constraint holds, because re-sampling can loop for a very long time at small
alpha (most clients receive nothing) and makes the result depend on how many retries happened.

What to do with a partition once made -- personal test splits that follow it, the label-count matrix, per-client
datasets, a heatmap -- is in `client_splits.py`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["dirichlet_label_partition", "group_dirichlet_partition", "iid_partition", "quantity_skew_partition"]

# ---------------------------------------------------------------------------------------------------------------------
# Validation and small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_int(value: Any, name: str, minimum: int) -> int:
    """Return `value` as a Python int, raising ValueError unless it is an integer >= `minimum`."""
    # bool is an int subclass, but `num_clients=True` is certainly a bug.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def _check_alpha(alpha: Any) -> float:
    """Return the Dirichlet concentration as a float, raising ValueError unless it is finite and > 0."""
    try:
        value = float(alpha)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`alpha` must be a positive finite number, got {alpha!r}.") from error
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`alpha` must be a positive finite number, got {alpha!r}.")
    return value


def _as_labels(labels: Any, num_labels: int | None) -> tuple[np.ndarray, int]:
    """Convert labels (list, array, `datasets` Column, ...) to a 1-D int64 array and resolve `num_labels`.

    Returns:
        `(labels, num_labels)`; `num_labels` defaults to `max(labels) + 1` (0 for no labels).

    Raises:
        ValueError: labels not 1-D integers, negative labels, labels >= `num_labels`, or `num_labels` < 1.
    """
    array = labels if isinstance(labels, np.ndarray) else np.asarray(labels)
    if array.dtype == object and array.ndim != 1:
        # Some sequence types (e.g. older `datasets` Column objects) do not convert directly; iterate them instead.
        array = np.asarray(list(labels))
    if array.ndim != 1:
        raise ValueError(f"`labels` must be 1-D, got shape {array.shape}.")
    if array.size == 0:
        # np.asarray([]) is float64; an empty label list is still a valid (if useless) integer label list.
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"`labels` must be integers, got dtype {array.dtype}.")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError(f"`labels` must be non-negative, got minimum label {int(array.min())}.")
    if num_labels is None:
        num_labels = int(array.max()) + 1 if array.size else 0
    else:
        num_labels = _check_int(num_labels, "num_labels", 1)
        if array.size and array.max() >= num_labels:
            raise ValueError(f"`labels` must be < num_labels={num_labels}, got label {int(array.max())}.")
    return array, num_labels


def _dirichlet(rng: np.random.Generator, alpha: float, size: int) -> np.ndarray:
    """Draw one symmetric Dirichlet(alpha) vector of length `size`, robust to tiny alpha.

    Sampling goes through normalised Gamma(alpha) draws. For alpha around 0.01 every Gamma draw can underflow to 0
    (and some numpy Dirichlet implementations then return NaN); the limit of Dirichlet(alpha) as alpha -> 0 puts all
    mass on one uniformly chosen coordinate, so that is what a degenerate draw becomes.
    """
    draws = rng.gamma(alpha, size=size)
    total = draws.sum()
    if not np.isfinite(total) or total <= 0 or not np.all(np.isfinite(draws)):
        probs = np.zeros(size, dtype=np.float64)
        probs[rng.integers(size)] = 1.0
        return probs
    return draws / total


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer `total` into integer counts proportional to non-negative `weights` (Hamilton's method).

    The counts sum exactly to `total`; entries with zero weight always get 0. Ties between equal remainders go to
    the lower index, so the result is deterministic.
    """
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(weights.shape[0], dtype=np.int64)
    weight_sum = weights.sum()
    if total == 0 or weight_sum <= 0:
        return counts
    quotas = weights / weight_sum * total
    counts = np.floor(quotas).astype(np.int64)
    # Rounding error could in theory push a floor past the total; never hand out more than `total`.
    while counts.sum() > total:
        counts[np.argmax(counts)] -= 1
    remainders = quotas - counts
    remainders[weights <= 0] = -1.0  # zero-weight entries must stay at zero
    missing = int(total - counts.sum())
    order = np.argsort(-remainders, kind="stable")
    positive = order[: int(np.count_nonzero(weights > 0))]
    # In exact arithmetic `missing` < number of positive weights; cycle defensively in case float error says otherwise.
    counts[positive[np.arange(missing) % positive.size]] += 1
    return counts


def _balance_sizes(sizes: np.ndarray, min_size: int) -> np.ndarray:
    """Raise every size to `min_size` by moving units from the currently largest entries (deterministic).

    Assumes `sizes.sum() >= len(sizes) * min_size`, which the callers check.
    """
    sizes = sizes.copy()
    while True:
        receiver = int(np.argmin(sizes))
        need = min_size - int(sizes[receiver])
        if need <= 0:
            return sizes
        donor = int(np.argmax(sizes))
        moved = min(need, int(sizes[donor]) - min_size)
        sizes[donor] -= moved
        sizes[receiver] += moved


def _finalize(parts: list[list[np.ndarray]] | list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate each client's pieces into one sorted int64 array."""
    result = []
    for pieces in parts:
        if isinstance(pieces, np.ndarray):
            array = pieces
        else:
            array = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        result.append(np.sort(array.astype(np.int64, copy=False)))
    return result


def _derived_seed(seed: int, group: Hashable) -> int:
    """A seed for one group that depends only on the caller's seed and the group's name.

    Using `str(group)` through CRC32 (unlike `hash()`, stable across processes) means a group's clients do not change
    when other groups are added to or removed from the dataset.
    """
    state = np.random.SeedSequence([seed, zlib.crc32(str(group).encode("utf-8"))]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


# ---------------------------------------------------------------------------------------------------------------------
# Partitioners
# ---------------------------------------------------------------------------------------------------------------------


def iid_partition(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle all examples and split them into `num_clients` parts whose sizes differ by at most one.

    Args:
        num_examples: Size of the dataset to split (indices `0 .. num_examples - 1`).
        num_clients: Number of clients.
        seed: Seed for `np.random.default_rng`.

    Returns:
        One sorted int64 index array per client; disjoint and together covering every example. When
        `num_examples < num_clients` some clients are empty.

    Raises:
        ValueError: `num_examples` < 0 or `num_clients` < 1 (or either is not an integer).
    """
    num_examples = _check_int(num_examples, "num_examples", 0)
    num_clients = _check_int(num_clients, "num_clients", 1)
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(num_examples).astype(np.int64)
    return _finalize(np.array_split(permutation, num_clients))


def dirichlet_label_partition(
    labels: Any,
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
    num_labels: int | None = None,
) -> list[np.ndarray]:
    """Label-skewed split: for every label, the clients' shares of that label follow Dirichlet(alpha).

    For each label in turn, its examples are shuffled and split among the clients with proportions drawn from a
    symmetric Dirichlet(alpha * ones(num_clients)), rounded with the largest-remainder method so the counts sum
    exactly. Small alpha (e.g. 0.01) gives each label to about one client; large alpha (e.g. 100) gives every client
    roughly the global label mix. Degenerate draws at tiny alpha (Gamma underflow) put the whole label on one random
    client instead of producing NaN.

    Clients left with fewer than `min_size` examples are then repaired without re-sampling: repeatedly, the smallest
    client receives examples from the currently largest client, taken from the label the donor holds most of (so the
    donor's mix changes least and the receiver still gets a single-label, i.e. skewed, block). This always terminates
    and is deterministic.

    Args:
        labels: 1-D non-negative integer labels (list, numpy array, or `datasets` Column).
        num_clients: Number of clients.
        alpha: Dirichlet concentration, finite and > 0.
        min_size: Minimum number of examples per client (>= 0).
        seed: Seed for `np.random.default_rng`.
        num_labels: Number of classes; defaults to `max(labels) + 1`.

    Returns:
        One sorted int64 index array (indices into `labels`) per client; disjoint and covering every example.

    Raises:
        ValueError: `num_clients` < 1, `alpha` not finite or <= 0, `min_size` < 0, `num_clients * min_size` larger
            than the number of examples, labels not 1-D integers, negative, or >= `num_labels`.
    """
    num_clients = _check_int(num_clients, "num_clients", 1)
    alpha = _check_alpha(alpha)
    min_size = _check_int(min_size, "min_size", 0)
    labels, num_labels = _as_labels(labels, num_labels)
    if num_clients * min_size > labels.size:
        raise ValueError(
            f"Cannot give each of {num_clients} clients at least min_size={min_size} examples: only {labels.size} "
            "examples. Lower `min_size` or `num_clients`."
        )
    rng = np.random.default_rng(seed)

    # buckets[client][label] holds that client's examples of that label, so the repair step can move whole labels.
    empty = np.zeros(0, dtype=np.int64)
    buckets = [[empty] * num_labels for _ in range(num_clients)]
    counts = np.zeros((num_clients, num_labels), dtype=np.int64)
    for label in range(num_labels):
        # One Dirichlet draw per label even if the label is absent, so the RNG stream does not depend on which
        # labels happen to occur.
        proportions = _dirichlet(rng, alpha, num_clients)
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        label_counts_ = _largest_remainder(members.size, proportions)
        for client, piece in enumerate(np.split(members, np.cumsum(label_counts_)[:-1])):
            buckets[client][label] = piece
        counts[:, label] = label_counts_

    # Deterministic repair for min_size (see docstring). Each iteration fills the receiver, exhausts the donor's
    # surplus, or exhausts one of the donor's labels, so the loop is bounded by O(num_clients * num_labels) steps.
    sizes = counts.sum(axis=1)
    while True:
        receiver = int(np.argmin(sizes))
        need = min_size - int(sizes[receiver])
        if need <= 0:
            break
        donor = int(np.argmax(sizes))
        label = int(np.argmax(counts[donor]))
        moved = min(need, int(sizes[donor]) - min_size, int(counts[donor, label]))
        # The examples within a bucket are in shuffled order, so taking the tail is a random choice.
        source = buckets[donor][label]
        buckets[donor][label] = source[: source.size - moved]
        buckets[receiver][label] = np.concatenate([buckets[receiver][label], source[source.size - moved :]])
        counts[donor, label] -= moved
        counts[receiver, label] += moved
        sizes[donor] -= moved
        sizes[receiver] += moved

    return _finalize(buckets)


def group_dirichlet_partition(
    labels: Any,
    groups: Sequence[Hashable],
    clients_per_group: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
    num_labels: int | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """The C2A paper's multilingual split: clients per group (e.g. language), Dirichlet label skew inside each group.

    Examples are grouped by `groups`; every group gets `clients_per_group` clients, and the group's examples are split
    among them with `dirichlet_label_partition` (same `alpha`, `min_size`, `num_labels`). Each group uses its own
    seed derived from `seed` and `str(group)`, so a group's clients do not change when other groups are added or
    removed. Every client holds examples of exactly one group.

    Args:
        labels: 1-D non-negative integer labels (list, numpy array, or `datasets` Column).
        groups: One hashable group value per example (same length as `labels`), e.g. language codes.
        clients_per_group: Number of clients for every group.
        alpha: Dirichlet concentration, finite and > 0.
        min_size: Minimum number of examples per client (>= 0), enforced within each group.
        seed: Base seed; each group's seed is derived from it.
        num_labels: Number of classes; defaults to `max(labels) + 1` over the whole dataset.

    Returns:
        `(partitions, names)`: one sorted int64 index array into the full dataset per client, and the matching client
        names `f"{group}-{i}"`. Groups are ordered by `str(group)`; within a group, clients are numbered from 0.

    Raises:
        ValueError: `groups` and `labels` differ in length, two distinct groups have the same `str()` (their client
            names would collide), a group has fewer than `clients_per_group * min_size` examples, or any argument is
            invalid for `dirichlet_label_partition`.
    """
    clients_per_group = _check_int(clients_per_group, "clients_per_group", 1)
    alpha = _check_alpha(alpha)
    min_size = _check_int(min_size, "min_size", 0)
    labels, num_labels = _as_labels(labels, num_labels)
    group_values = list(groups)
    if len(group_values) != labels.size:
        raise ValueError(f"`groups` has {len(group_values)} entries but `labels` has {labels.size}.")

    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(group_values):
        members.setdefault(group, []).append(index)
    ordered = sorted(members, key=str)
    names_seen: dict[str, Hashable] = {}
    for group in ordered:
        if str(group) in names_seen:
            raise ValueError(
                f"Groups {names_seen[str(group)]!r} and {group!r} have the same name {str(group)!r}; client names "
                "would collide."
            )
        names_seen[str(group)] = group

    partitions: list[np.ndarray] = []
    names: list[str] = []
    for group in ordered:
        subset = np.asarray(members[group], dtype=np.int64)
        try:
            local = dirichlet_label_partition(
                labels[subset],
                clients_per_group,
                alpha,
                min_size=min_size,
                seed=_derived_seed(seed, group),
                num_labels=num_labels,
            )
        except ValueError as error:
            raise ValueError(f"Group {group!r}: {error}") from error
        for client, positions in enumerate(local):
            # `subset` is sorted, so mapping sorted local positions through it keeps the result sorted.
            partitions.append(subset[positions])
            names.append(f"{group}-{client}")
    return partitions, names


def quantity_skew_partition(
    num_examples: int,
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Quantity-skewed split: client sizes follow Dirichlet(alpha), examples are assigned IID.

    Client proportions are drawn from a symmetric Dirichlet(alpha) and turned into sizes with the largest-remainder
    method. Clients below `min_size` are then topped up from the currently largest client (deterministic, no
    re-sampling). Finally a random permutation of the examples is cut into pieces of those sizes, so every client's
    label mix is (up to sampling noise) the global one and only the amount of data differs.

    Args:
        num_examples: Size of the dataset to split (indices `0 .. num_examples - 1`).
        num_clients: Number of clients.
        alpha: Dirichlet concentration, finite and > 0; small values give very unequal sizes.
        min_size: Minimum number of examples per client (>= 0).
        seed: Seed for `np.random.default_rng`.

    Returns:
        One sorted int64 index array per client; disjoint and covering every example.

    Raises:
        ValueError: `num_examples` < 0, `num_clients` < 1, `alpha` not finite or <= 0, `min_size` < 0, or
            `num_clients * min_size > num_examples`.
    """
    num_examples = _check_int(num_examples, "num_examples", 0)
    num_clients = _check_int(num_clients, "num_clients", 1)
    alpha = _check_alpha(alpha)
    min_size = _check_int(min_size, "min_size", 0)
    if num_clients * min_size > num_examples:
        raise ValueError(
            f"Cannot give each of {num_clients} clients at least min_size={min_size} examples: only {num_examples} "
            "examples. Lower `min_size` or `num_clients`."
        )
    rng = np.random.default_rng(seed)
    sizes = _largest_remainder(num_examples, _dirichlet(rng, alpha, num_clients))
    sizes = _balance_sizes(sizes, min_size)
    permutation = rng.permutation(num_examples).astype(np.int64)
    return _finalize(np.split(permutation, np.cumsum(sizes)[:-1]))
