"""modeconn benchmarks: `python -m benchmarks [name ...]` runs the bench_<name>.py modules."""
