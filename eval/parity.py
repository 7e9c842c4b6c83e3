"""Our ViT's parity with timm on the same random weights. `python -m eval.parity --help`."""

from tome_jax.cli.parity import main

if __name__ == "__main__":
    main()
