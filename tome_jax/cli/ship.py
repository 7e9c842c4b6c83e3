"""Turns a training workdir's newest checkpoint into a model directory.

    python -m train.ship --workdir runs/cifar10 --out models/cifar10_vit

Writes the layout of `tome_jax.checkpoint` (params.msgpack + config.json), which every
eval/vis/export command and `init_from` read. Prints {"out", "step"} as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from tome_jax.cli.args import make_parser, run


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m train.ship", __doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="new directory (must not exist)")
    return parser


def _ship(args: argparse.Namespace) -> None:
    from tome_jax.training.ship import ship

    out, step = ship(args.workdir, args.out)
    print(json.dumps({"out": str(out), "step": step}))


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _ship, argv)


if __name__ == "__main__":
    main()
