"""auditq's performance harness and experiments: run from a checkout, never installed.

`python -m benchmarks.harness` runs the comparison (see README.md here); the other modules are
single experiments, each runnable as `python -m benchmarks.<name>`.
"""
