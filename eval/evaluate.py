"""Top-1 / top-5 at one r, sharded. `python -m eval.evaluate --help`."""
from tome_jax.cli.evaluate import main

if __name__ == "__main__":
    main()
