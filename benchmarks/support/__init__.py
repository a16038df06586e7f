"""Support code for the benchmarks: real offline models and data sets converted or loaded from PyPI packages."""
