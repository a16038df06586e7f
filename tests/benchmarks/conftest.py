"""Fixtures of the benchmark tests: benchmarks/federated.py loaded as a module, and its package's modules."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "federated.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_federated", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """The command line (benchmarks/federated.py): planning, running, arguments."""
    return load_benchmark()


@pytest.fixture(scope="module")
def proto(bench):
    """Definitions, run files and the pure helpers (importable once the command line has set up sys.path)."""
    return importlib.import_module("benchmarks.federated_bench.protocol")


@pytest.fixture(scope="module")
def worker(bench):
    return importlib.import_module("benchmarks.federated_bench.worker")


@pytest.fixture(scope="module")
def federation(bench):
    """A run's clients: data, partition, validation carve (imported once the command line has set up sys.path)."""
    return importlib.import_module("benchmarks.federated_bench.federation")


@pytest.fixture(scope="module")
def reporting(bench):
    return importlib.import_module("benchmarks.federated_bench.report")
