"""modeconn benchmarks: `python -m benchmarks [name ...]` runs bench_<name>.py modules (all by default)."""
