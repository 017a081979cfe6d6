"""Benchmarks: CLIs that print a table and write JSON (`moa bench e2e`, ...)."""
