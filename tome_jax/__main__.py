"""`python -m tome_jax COMMAND ...`: the `tome-jax` command (see `tome_jax.cli.main`)."""

import sys

from tome_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m tome_jax"))
