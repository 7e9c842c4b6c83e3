"""Train or fine-tune a ViT with ToMe merging. `python -m train.train --help`."""
from tome_jax.cli.train import main

if __name__ == "__main__":
    main()
