"""`python -m tome_jax.convert SRC DST ...`: see `tome_jax.cli.convert`."""

from tome_jax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
