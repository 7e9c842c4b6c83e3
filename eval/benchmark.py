"""Throughput of ToMe schedules against the FLOPs limit. `python -m eval.benchmark --help`."""

from tome_jax.cli.benchmark import main

if __name__ == "__main__":
    main()
