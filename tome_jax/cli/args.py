"""Argument helpers shared by every command line: one `--r` syntax, one way to report errors.

    p = make_parser("python -m eval.sweep", __doc__)
    add_r(p, many=True, default=["0", "8"])
    return run(p, lambda args: sweep(...), argv)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tome_jax.schedule import Schedule, parse_schedule
from tome_jax.vit import ViT

Params = Any

# Set to 1 for a traceback instead of the one-line error of a user error.
DEBUG_ENV = "TOME_JAX_DEBUG"
R_HELP = "ToMe schedule: 8 | 8,-1 (r, inflect) | [8,8,4] (per layer)"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every default."""


def make_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser named after the command a user types, defaults shown in --help."""
    from tome_jax.cli.main import invoked_as  # "tome-jax sweep" under the tome-jax command

    return argparse.ArgumentParser(prog=invoked_as(prog), description=description,
                                   formatter_class=_Formatter)


def r_value(text: str) -> Schedule:
    """argparse type of one schedule: "8" -> 8, "8,-1" -> (8, -1.0), "[8,8,4]" -> per layer."""
    try:
        return parse_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_r(parser: argparse.ArgumentParser, *, many: bool, default: Any,
          help: str | None = None) -> None:
    """--r: one schedule, or (many) several after one flag; each value parsed by `r_value`.

    Defaults given as text are parsed too, so `args.r` always holds schedules.
    """
    if many:
        default = [r_value(v) if isinstance(v, str) else v for v in default]
        parser.add_argument("--r", type=r_value, nargs="+", default=default,
                            help=help or R_HELP + "; several to compare them")
    else:
        default = r_value(default) if isinstance(default, str) else default
        parser.add_argument("--r", type=r_value, default=default, help=help or R_HELP)


# The input normalization of random weights (and of model directories that do not name one).
DEFAULT_NORMALIZATION = "augreg"


def load_weights(checkpoint: str | None, *, image_size: int | None,
                 normalization: str | None, **overrides: Any
                 ) -> tuple[ViT | None, Params | None, int, str]:
    """(model, params, image size, normalization) for evaluating a model directory.

    checkpoint: a model directory (`tome_jax.checkpoint.load_model`, with `overrides` such as
      r=8), or None for random weights: then model and params are None (the caller builds
      them once it knows the data's class count).
    image_size, normalization: the command line's, None where not given. They override the
      directory's, except that the image size must be the directory's: its position
      embeddings fit one grid only. Random weights default to 224 px and "augreg".
    """
    from tome_jax import checkpoint as ckpt
    from tome_jax import normalization as norm

    if normalization is not None:
        norm.check(normalization)
    if checkpoint is None:
        return (None, None, image_size or ckpt.DEFAULT_IMAGE_SIZE,
                normalization or DEFAULT_NORMALIZATION)
    model, params, info = ckpt.load_model(checkpoint, **overrides)
    size = info.image_size[0]
    if image_size and image_size != size:
        raise ValueError(f"{checkpoint} was converted for {size} px, not {image_size}; convert "
                         f"again with python -m tome_jax.convert ... --image-size {image_size}")
    return model, params, size, normalization or info.normalization


def add_data(parser: argparse.ArgumentParser, *, split_help: str = "tfds split spec; default "
             "the eval split", required: bool = True) -> None:
    """--data --split --data-dir --normalization: where the images come from and how they are
    scaled (--normalization defaults to the model directory's)."""
    from tome_jax import sources
    from tome_jax.normalization import NORMALIZATIONS

    parser.add_argument("--data", required=required, choices=sources.NAMES)
    parser.add_argument("--split", default=None, help=split_help)
    parser.add_argument("--data-dir", default=None, help="source location (see tome_jax.sources)")
    parser.add_argument("--normalization", default=None, choices=tuple(NORMALIZATIONS),
                        help="default: the model directory's; random weights: "
                             f"{DEFAULT_NORMALIZATION}")


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """--skip-bad-images --eval-crop --image-size: how evaluation images are read."""
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out image files that do not decode (or differ from the "
                             "folder's SHA256SUMS), count and list them; without it the first "
                             "stops the run")
    parser.add_argument("--eval-crop", type=float, default=None)
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the model directory's, else 224")


def add_distributed(parser: argparse.ArgumentParser) -> None:
    """Multi-process flags, handed to `sharding.initialize_distributed`."""
    parser.add_argument("--coordinator", default=None,
                        help="host:port of process 0 for multi-process runs, or 'auto' where "
                             "JAX finds the cluster itself (Cloud TPU pods, Slurm)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="processes in the run (with --coordinator)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="this process's index, 0 .. num-processes - 1")


def one_line(message: str) -> str:
    """A message as one line (a reader's or a library's text may carry line breaks)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (reported in one line), not bugs."""
    from tome_jax.checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError)


def run(parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], Any],
        argv: Sequence[str] | None = None) -> Any:
    """Parses argv and returns fn(args); a user error exits 2 with one `PROG: error:` line.

    Set TOME_JAX_DEBUG=1 to get the traceback instead.
    """
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except user_errors() as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{parser.prog}: error: {one_line(str(e))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_logging_to_file(parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], Any],
                        argv: Sequence[str] | None = None) -> Any:
    """`run`, with args.whole_process telling fn how long to send the libraries' logs to a file.

    Run as a command (argv None), until the process ends: orbax's threads may still report
    after the work returned. Called with argv (a program, a test), only while fn runs.
    """
    parser.set_defaults(whole_process=argv is None)
    return run(parser, fn, argv)


def failure_line(err: BaseException, path: object = None) -> str:
    """One line for a failed write or save: "No space left on device: PATH" for an OSError
    (path when the error names no file), else the message's first line."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename or path
        return f"{err.strerror}: {where}" if where else err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__

