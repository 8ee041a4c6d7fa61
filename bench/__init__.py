"""Benchmark harness of SlicerProtonDIR: suites, peers, tables and plots (see bench/README.md)."""
