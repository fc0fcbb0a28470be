"""The benchmark harness behind `auditq bench` (installed with the package so the command
works anywhere; `benchmarks/` in the repository holds its results and notes)."""
