"""Turns a training workdir's newest usable checkpoint into a model directory.

    python -m train.ship --workdir runs/cifar10 --out models/cifar10_vit

Writes the layout of `tome_jax.checkpoint` (params.msgpack + config.json), which every
eval/vis/export command and `init_from` read. Prints {"out", "step"} as JSON. Checkpoints are
checked as training checks them; an unusable one is skipped with one warning line (nothing in
the workdir is moved), and the libraries' logs go to WORKDIR/ship.log. WORKDIR and OUT may be
object-store URLs (gs://bucket/run). Errors are one `PROG: error:` line: exit 2 for bad input
or no usable checkpoint, exit 1 when a file could not be read or written (a full disk).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tome_jax.cli.args import failure_line, make_parser, run_logging_to_file


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m train.ship", __doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="new directory (must not exist)")
    parser.add_argument("--param-dtype", choices=("float32", "float16"), default="float32",
                        help="float16: store the matrices as float16, half the file (vectors "
                             "stay float32; every load computes in float32)")
    return parser


def _ship(args: argparse.Namespace, prog: str) -> None:
    from tome_jax.training.messages import library_logs, one_line_warnings
    from tome_jax.training.ship import log_path, ship

    # A gs:// workdir's log is written locally (a FileHandler cannot write to a bucket), then
    # copied into the workdir by `ship`.
    with library_logs(log_path(args.workdir), args.whole_process), one_line_warnings():
        try:
            out, step = ship(args.workdir, args.out, args.param_dtype)
        except OSError as err:
            if isinstance(err, (FileNotFoundError, FileExistsError)) or not err.strerror:
                raise
            print(f"{prog}: error: {failure_line(err, args.out)}", file=sys.stderr)
            raise SystemExit(1) from None
    print(json.dumps({"out": str(out), "step": step}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    run_logging_to_file(parser, lambda args: _ship(args, parser.prog), argv)


if __name__ == "__main__":
    main()
