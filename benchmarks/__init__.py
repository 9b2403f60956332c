"""Reproducible timings: ``python -m benchmarks`` prints the performance table (see
``__main__``); the other modules here are single-purpose scripts run by path."""
