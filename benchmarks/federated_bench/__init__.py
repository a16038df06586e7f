"""The federated benchmark's modules: `protocol` (definitions, run files), `worker` (one run), `report` (summary,
plots, targets). The command line is benchmarks/federated.py."""
