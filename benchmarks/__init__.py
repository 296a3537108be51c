"""Side-by-side timing harness: ``python -m benchmarks [--quick]`` (see run.py)."""
