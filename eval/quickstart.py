"""The README's quick start on the shipped CIFAR-10 ViT. `python -m eval.quickstart --help`."""
from tome_jax.cli.quickstart import main

if __name__ == "__main__":
    main()
