"""Benchmarks run on a GPU machine (python -m benchmarks.<name>); they print what they measured and where."""
