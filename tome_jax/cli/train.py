"""Train or fine-tune a ViT with ToMe merging: sharded, preemption-safe, resumable.

    python -m train.train --config train/configs/cifar10_vit.json --workdir runs/cifar10
    python -m train.train --config ... --workdir ... --set r=4 lr=3e-4 steps=2000

Every field of `tome_jax.training.Config` can be set in the JSON file or with --set (given
several times, all apply; a later value of a key wins). Rerunning the same command resumes
from the workdir's newest usable checkpoint; the result is the same as an uninterrupted run's.
One trainer per workdir (WORKDIR/train.lock). Errors are one `error:` line: exit 2 for bad
input, a locked workdir or no usable checkpoint; exit 1 when a checkpoint or file could not be
written (a full disk). The libraries' logs go to WORKDIR/train.log.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tome_jax import sharding
from tome_jax.cli.args import add_distributed, failure_line, make_parser, run_logging_to_file


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m train.train", __doc__)
    parser.add_argument("--config", help="JSON file of Config fields")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE",
                        help="override config fields (may be repeated)")
    parser.add_argument("--fresh-start", action="store_true",
                        help="when the workdir's checkpoints are all unusable (they are moved "
                             "aside), train from step 0 instead of refusing to start")
    add_distributed(parser)
    # One process unless told otherwise: --coordinator host:port alone is a 1-process cluster.
    parser.set_defaults(num_processes=1, process_id=0)
    return parser


def _train(args: argparse.Namespace, prog: str) -> None:
    from tome_jax.training import load_config  # not needed by --help

    cfg = load_config(args.config, args.set)  # bad input fails before any cluster set-up
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from tome_jax.training import SaveError, train
    from tome_jax.training.loop import log_path
    from tome_jax.training.messages import library_logs, one_line_warnings

    with library_logs(log_path(args.workdir), args.whole_process), one_line_warnings():
        try:
            train(cfg, args.workdir, fresh_start=args.fresh_start)
        except (SaveError, OSError) as err:
            if isinstance(err, (FileNotFoundError, FileExistsError)):
                raise
            print(f"{prog}: error: {failure_line(err)}", file=sys.stderr)
            raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    run_logging_to_file(parser, lambda args: _train(args, parser.prog), argv)


if __name__ == "__main__":
    main()
