"""Fixtures of the benchmark tests: benchmarks/federated.py loaded as a module, and its package's modules."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ..script_loading import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "federated.py"


def load_benchmark():
    return load_script("benchmark_federated", SCRIPT)


@pytest.fixture(scope="module")
def bench():
    """The command line (benchmarks/federated.py): planning, running, arguments."""
    return load_benchmark()


def _package_module(fixture_name: str, module: str, doc: str):
    """A fixture returning `benchmarks.federated_bench.<module>` (importable once the command line has set up
    sys.path, hence the `bench` dependency)."""

    def fixture(bench):
        return importlib.import_module(f"benchmarks.federated_bench.{module}")

    fixture.__doc__ = doc
    return pytest.fixture(scope="module", name=fixture_name)(fixture)


proto = _package_module("proto", "protocol", "Definitions, run files and the pure helpers.")
worker = _package_module("worker", "worker", "One run in its worker process.")
federation = _package_module("federation", "federation", "A run's clients: data, partition, validation carve.")
reporting = _package_module("reporting", "report", "Run files -> summary and targets.")
