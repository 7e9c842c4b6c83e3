"""Accuracy or fidelity against cost over r and strategies. `python -m eval.sweep --help`."""
from tome_jax.cli.sweep import main

if __name__ == "__main__":
    main()
