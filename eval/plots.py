"""Redraws a sweep's plot from its CSV. `python -m eval.plots --help`."""
from tome_jax.cli.plots import main

if __name__ == "__main__":
    main()
