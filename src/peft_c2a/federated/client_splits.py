"""From a partition to clients: personal test splits that follow each client's training label mix, the label-count
matrix C2A's descriptors come from, per-client `datasets.Dataset`s, and a client x label heatmap.

* `partition_like` / `grouped_partition_like`: split another dataset (the test split) so each client's share of
  every label follows its training share (within its own group, e.g. language, for the grouped one). Personalised
  models are evaluated on such splits.
* `sample_like`: a fixed-size personal test set per client with its training label mix, drawn from the whole pool
  (clients may share examples), so that small clients still get a score of usable resolution.
* `label_counts`: the `(num_clients, num_labels)` count matrix.
* `client_datasets_from_partitions`: one `datasets.Dataset` per client.
* `plot_label_heatmap`: the count matrix as a PNG (matplotlib is imported lazily, only there: it is optional).

Partitions are as in `partitioning.py`: one sorted, disjoint `np.int64` index array per client (`sample_like`'s arrays
need not be disjoint); everything here is deterministic given `seed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .partitioning import _as_labels, _finalize, _largest_remainder

__all__ = [
    "client_datasets_from_partitions",
    "grouped_partition_like",
    "label_counts",
    "partition_like",
    "plot_label_heatmap",
]

# Annotating every cell is only readable for small matrices (rows = clients, columns = labels).
_MAX_ANNOTATED_ROWS = 30
_MAX_ANNOTATED_COLS = 20


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


def sample_like(labels: Any, reference_counts: np.ndarray, size: int, seed: int = 0) -> list[np.ndarray]:
    """A personal test set of `size` examples per client whose label mix follows the client's reference mix, drawn
    from the whole pool independently for each client (two clients may share test examples).

    `partition_like` divides the pool, so a client with a 1% share of the training data gets ~1% of the test split:
    under strong label skew that is 1-3 examples, too few to score a client (one example moves its accuracy by a
    third). Drawing a fixed number per client gives every client a score of the same resolution; the examples stay
    disjoint from every client's training data because they come from the test pool. Per client, each label gets
    `size * share` examples (largest-remainder rounding), capped at what the pool holds of that label, without
    replacement within the client; a client whose labels the pool lacks gets fewer.

    Args:
        labels: 1-D non-negative integer labels of the pool (list, numpy array, or `datasets` Column).
        reference_counts: `(num_clients, num_labels)` non-negative counts (the clients' training label counts).
        size: examples per client (>= 1).
        seed: Seed for `np.random.default_rng`.

    Returns:
        One sorted int64 index array per client.
    """
    if size < 1:
        raise ValueError(f"`size` must be >= 1, got {size}.")
    reference = np.asarray(reference_counts, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[0] < 1 or not np.all(np.isfinite(reference)) or np.any(reference < 0):
        raise ValueError("`reference_counts` must be a (num_clients, num_labels) matrix of finite counts >= 0.")
    labels, num_labels = _as_labels(labels, reference.shape[1])
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(labels == label) for label in range(num_labels)]
    parts = []
    for row in reference:
        wanted = _largest_remainder(size, row) if row.sum() > 0 else np.zeros(num_labels, dtype=np.int64)
        picked = [
            rng.choice(pool, size=min(int(n), pool.size), replace=False) for pool, n in zip(pools, wanted, strict=True)
        ]
        parts.append(np.sort(np.concatenate(picked)).astype(np.int64))
    return parts


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
