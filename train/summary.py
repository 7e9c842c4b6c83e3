"""A table of training runs from their metrics.jsonl. `python -m train.summary --help`."""
from tome_jax.cli.summary import main

if __name__ == "__main__":
    main()
