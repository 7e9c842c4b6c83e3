"""Paired comparison of models on the same images. `python -m eval.paired --help`."""
from tome_jax.cli.paired import main

if __name__ == "__main__":
    main()
