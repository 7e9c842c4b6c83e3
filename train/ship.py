"""A training checkpoint -> a model directory. `python -m train.ship --help`."""
from tome_jax.cli.ship import main

if __name__ == "__main__":
    main()
