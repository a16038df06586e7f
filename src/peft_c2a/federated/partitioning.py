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
* `partition_like`: gives each client a personal evaluation split whose label mix follows its training mix.

A partition is a list with one sorted, disjoint `np.int64` index array per client. Every function is deterministic
given `seed`: all randomness comes from `np.random.default_rng(seed)` (never numpy's global RNG), so the same call
returns the same split on every machine and run. Minimum client sizes are enforced by a deterministic repair step
rather than by re-sampling until the constraint holds, because re-sampling can loop for a very long time at small
alpha (most clients receive nothing) and makes the result depend on how many retries happened.

`label_counts` gives the `(num_clients, num_labels)` count matrix that C2A uses as client descriptors,
`client_datasets_from_partitions` turns a partition into `datasets.Dataset` objects, and `plot_label_heatmap` draws
the count matrix (matplotlib is imported lazily, only there, since it is an optional dependency).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = [
    "client_datasets_from_partitions",
    "dirichlet_label_partition",
    "group_dirichlet_partition",
    "iid_partition",
    "label_counts",
    "partition_like",
    "plot_label_heatmap",
    "quantity_skew_partition",
]

# Annotating every cell is only readable for small matrices (rows = clients, columns = labels).
_MAX_ANNOTATED_ROWS = 30
_MAX_ANNOTATED_COLS = 20


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


def partition_like(labels: Any, reference_counts: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Split another dataset (e.g. the test split) so each client's label mix follows a reference partition.

    For every label c, the examples with label c are shuffled and divided among the clients in proportion to
    `reference_counts[:, c]` (largest-remainder rounding). A client that holds no examples of label c in the reference
    therefore receives none here. This gives each client a personal evaluation set matching its training mix, which is
    what personalised (client-customised) models should be evaluated on.

    Examples whose label no client holds in `reference_counts` (an all-zero column) are left unassigned: they appear in
    no returned array. Clients may receive empty arrays when the split is small (e.g. a client with a 1% share of a
    label that has 20 examples gets nothing).

    Args:
        labels: 1-D non-negative integer labels of the dataset to split (list, numpy array, or `datasets` Column);
            every label must be < `reference_counts.shape[1]`.
        reference_counts: `(num_clients, num_labels)` matrix of non-negative counts (or any non-negative weights),
            typically `label_counts(train_partitions, train_labels, num_labels)`.
        seed: Seed for `np.random.default_rng`.

    Returns:
        One sorted int64 index array (indices into `labels`) per row of `reference_counts`; disjoint.

    Raises:
        ValueError: `reference_counts` not 2-D with at least one row and column, negative or non-finite entries, or
            labels not 1-D integers in `[0, num_labels)`.
    """
    reference = np.asarray(reference_counts)
    if reference.ndim != 2 or reference.shape[0] < 1 or reference.shape[1] < 1:
        raise ValueError(f"`reference_counts` must be a (num_clients, num_labels) matrix, got shape {reference.shape}.")
    if reference.dtype.kind not in "iuf":
        raise ValueError(f"`reference_counts` must be numeric, got dtype {reference.dtype}.")
    reference = reference.astype(np.float64)
    if not np.all(np.isfinite(reference)):
        raise ValueError("`reference_counts` contains NaN or infinite values.")
    if np.any(reference < 0):
        raise ValueError("`reference_counts` contains negative values.")
    num_clients, num_labels = reference.shape
    labels, _ = _as_labels(labels, num_labels)
    rng = np.random.default_rng(seed)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in range(num_labels):
        members = np.flatnonzero(labels == label)
        # Shuffle every label (even unassigned ones) so the RNG stream does not depend on the reference's zeros.
        rng.shuffle(members)
        counts = _largest_remainder(members.size, reference[:, label])
        if counts.sum() == 0:
            continue  # no client holds this label in the reference (or no examples of it here): unassigned
        for client, piece in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[client].append(piece)
    return _finalize(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Utilities
# ---------------------------------------------------------------------------------------------------------------------


def label_counts(partitions: Sequence[np.ndarray], labels: Any, num_labels: int) -> np.ndarray:
    """Count each client's examples per label: the client label distributions that condition C2A.

    Args:
        partitions: One index array per client (indices into `labels`).
        labels: 1-D non-negative integer labels (list, numpy array, or `datasets` Column), all < `num_labels`.
        num_labels: Number of classes (number of columns of the result).

    Returns:
        `(num_clients, num_labels)` int64 matrix; row i is `np.bincount(labels[partitions[i]], minlength=num_labels)`.

    Raises:
        ValueError: invalid labels or `num_labels`, or a partition holding non-integer or out-of-range indices.
    """
    labels, num_labels = _as_labels(labels, num_labels)
    counts = np.zeros((len(partitions), num_labels), dtype=np.int64)
    for client, indices in enumerate(partitions):
        indices = np.asarray(indices)
        if indices.size == 0:
            continue
        if indices.dtype.kind not in "iu":
            raise ValueError(f"Partition {client} must hold integer indices, got dtype {indices.dtype}.")
        if indices.min() < 0 or indices.max() >= labels.size:
            raise ValueError(f"Partition {client} has indices outside [0, {labels.size}).")
        counts[client] = np.bincount(labels[indices], minlength=num_labels)
    return counts


def client_datasets_from_partitions(
    dataset: datasets.Dataset,
    partitions: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    prefix: str = "client",
) -> dict[str, datasets.Dataset]:
    """Materialise a partition as one `datasets.Dataset` per client (`dataset.select(indices)`).

    Args:
        dataset: The dataset the partition indexes into.
        partitions: One index array per client.
        names: Client names, one per partition; defaults to `f"{prefix}-{i}"` with `i` zero-padded to the number of
            digits of `num_clients - 1` (at least 2), so names sort in client order.
        prefix: Name prefix used when `names` is None.

    Returns:
        Dict from client name to that client's dataset, in partition order.

    Raises:
        ValueError: `names` has a different length than `partitions` or contains duplicates.
    """
    num_clients = len(partitions)
    if names is None:
        width = max(2, len(str(max(num_clients - 1, 0))))
        names = [f"{prefix}-{i:0{width}d}" for i in range(num_clients)]
    else:
        names = list(names)
        if len(names) != num_clients:
            raise ValueError(f"`names` has {len(names)} entries but there are {num_clients} partitions.")
        if len(set(names)) != len(names):
            raise ValueError("`names` contains duplicate client names.")
    return {
        name: dataset.select(np.asarray(indices, dtype=np.int64))
        for name, indices in zip(names, partitions, strict=True)
    }


def plot_label_heatmap(
    counts: np.ndarray,
    path: str | os.PathLike[str],
    client_names: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw a client x label heatmap of label counts and save it as a PNG.

    Cells are annotated with their counts when the matrix has at most 30 clients and 20 labels. The figure is drawn on
    a standalone Agg canvas (not through pyplot), so it works headless, never touches the caller's pyplot state or
    backend, and is released when the function returns.

    Args:
        counts: `(num_clients, num_labels)` non-negative count matrix, e.g. from `label_counts`.
        path: Output file; parent directories are created.
        client_names: Row labels, one per client (default: client indices).
        label_names: Column labels, one per label (default: label indices).
        title: Optional figure title.

    Returns:
        The path written, as a `pathlib.Path`.

    Raises:
        ValueError: `counts` is not a 2-D numeric matrix, or `client_names` / `label_names` has the wrong length.
        ImportError: matplotlib (a dependency of peft-c2a) is not installed.
    """
    matrix = np.asarray(counts)
    if matrix.ndim != 2 or matrix.dtype.kind not in "iuf":
        raise ValueError(f"`counts` must be a 2-D numeric matrix, got shape {matrix.shape} and dtype {matrix.dtype}.")
    num_clients, num_labels = matrix.shape
    if client_names is not None and len(client_names) != num_clients:
        raise ValueError(f"`client_names` has {len(client_names)} entries but `counts` has {num_clients} rows.")
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"`label_names` has {len(label_names)} entries but `counts` has {num_labels} columns.")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # optional dependency
        raise ImportError("plot_label_heatmap needs matplotlib: pip install matplotlib.") from error

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Size the figure with the matrix so cells (and their annotations) stay legible; clamp to sane bounds.
    width = min(max(4.0, 0.6 * num_labels + 2.5), 30.0)
    height = min(max(3.0, 0.35 * num_clients + 1.5), 40.0)
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure
    axes = figure.add_subplot()
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="examples")
    axes.set_xlabel("label")
    axes.set_ylabel("client")
    if title is not None:
        axes.set_title(title)
    # Explicit ticks only while they fit; otherwise matplotlib's default locator picks a readable subset.
    if num_labels <= 50:
        x_labels = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(num_labels)]
        axes.set_xticks(range(num_labels), labels=x_labels)
    if num_clients <= 60:
        y_labels = [str(n) for n in client_names] if client_names is not None else [str(i) for i in range(num_clients)]
        axes.set_yticks(range(num_clients), labels=y_labels)
    if num_clients <= _MAX_ANNOTATED_ROWS and num_labels <= _MAX_ANNOTATED_COLS and matrix.size:
        # Dark text on the bright end of viridis, light text on the dark end.
        threshold = (float(matrix.max()) + float(matrix.min())) / 2
        for row in range(num_clients):
            for col in range(num_labels):
                value = matrix[row, col]
                text = f"{int(value)}" if matrix.dtype.kind in "iu" else f"{value:.3g}"
                color = "black" if value > threshold else "white"
                axes.text(col, row, text, ha="center", va="center", color=color, fontsize=8)
    figure.savefig(path, format="png", dpi=100)
    return path


def grouped_partition_like(
    labels: Any,
    groups: Sequence[Any],
    counts: np.ndarray,
    client_groups: Sequence[Any],
    seed: int,
) -> list[np.ndarray]:
    """`partition_like` inside each group: a client's personal test split comes from its own group (language) only.

    Plain `partition_like` would hand a German client test examples in any language.

    Args:
        labels: labels of the dataset to split.
        groups: the group of each example of that dataset (e.g. its language).
        counts: `(num_clients, num_labels)` reference counts, as for `partition_like`.
        client_groups: the group of each client (row of `counts`).
        seed: seed of the split (each group draws from its own stream).

    Returns:
        One sorted int64 index array per client; a client whose group has no example gets an empty array.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups])
    client_groups = [str(g) for g in client_groups]
    result = [np.zeros(0, dtype=np.int64) for _ in client_groups]
    for position, group in enumerate(sorted(set(client_groups))):
        rows = [i for i, g in enumerate(client_groups) if g == group]
        members = np.flatnonzero(groups == group)
        if members.size == 0:
            continue
        parts = partition_like(labels[members], counts[rows], seed=seed + 7919 * (position + 1))
        for row, part in zip(rows, parts, strict=True):
            result[row] = np.sort(members[part])
    return result
