"""Several sweep CSVs side by side at the same r. `python -m eval.table --help`."""
from tome_jax.cli.table import main

if __name__ == "__main__":
    main()
