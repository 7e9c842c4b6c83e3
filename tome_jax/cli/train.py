"""Train or fine-tune a ViT with ToMe merging: sharded, preemption-safe, resumable.

    python -m train.train --config train/configs/cifar10_vit.json --workdir runs/cifar10
    python -m train.train --config ... --workdir ... --set r=4 lr=3e-4 steps=2000

Every field of `tome_jax.training.Config` can be set in the JSON file or with --set. Rerunning
the same command resumes from the workdir's newest checkpoint; the result is the same as an
uninterrupted run's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tome_jax import sharding
from tome_jax.cli.args import add_distributed, make_parser, run


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m train.train", __doc__)
    parser.add_argument("--config", help="JSON file of Config fields")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields")
    add_distributed(parser)
    # One process unless told otherwise: --coordinator host:port alone is a 1-process cluster.
    parser.set_defaults(num_processes=1, process_id=0)
    return parser


def _train(args: argparse.Namespace) -> None:
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from tome_jax.training import load_config, train  # not needed by --help

    train(load_config(args.config, args.set), args.workdir)


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _train, argv)


if __name__ == "__main__":
    main()
