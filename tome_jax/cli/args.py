"""Argument helpers shared by every command line: one parser factory, one `--r` syntax, one way
to report errors.

    p = make_parser("python -m eval.sweep", __doc__)
    add_r(p, many=True, default=["0", "8"])
    return run(p, lambda args: sweep(...), argv)

The convention every command follows:
- a flag of several values takes them after one flag (`--r 0 8 16`); the flag given twice is an
  error (`--r given twice; give all values after one --r: --r 0 8`), never a silent last-wins;
- `--batch-size` and `--image-size` everywhere; a former name (`--batch`, `--resolution`) still
  works, hidden from --help, and says its new name in one warning line on stderr;
- --help shows each default and the program name the user typed (`tome-jax sweep` or
  `python -m eval.sweep`, see `tome_jax.cli.main.invoked_as`);
- a user error is one `PROG: error: ...` line and exit status 2; `--debug` (or
  TOME_JAX_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tome_jax.schedule import Schedule, parse_schedule
from tome_jax.vit import ViT

Params = Any

# Set to 1 for a traceback instead of the one-line error of a user error (as --debug does).
DEBUG_ENV = "TOME_JAX_DEBUG"
R_HELP = "ToMe schedule: 8 | 8,-1 (r, inflect) | [8,8,4] (per layer)"
# Namespace attribute of the flags given so far (dest -> values), removed once parsing ends.
_GIVEN = "_tome_jax_given"


def _shown(value: Any) -> str:
    """A default as a user would type it: lists space-separated, schedules as `--r` reads them."""
    if isinstance(value, list):
        return " ".join(_schedule_or_value(v) for v in value)
    return _schedule_or_value(value)


def _schedule_or_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # per-layer [8,8,4], or (r, inflect)
        from tome_jax.sweep import schedule_text

        return schedule_text(value)
    return str(value)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout; shows every option's default, except where there
    is nothing to show (None, a switch off, an empty list) or the help text already says it."""

    @staticmethod
    def _default_note(action: argparse.Action) -> str | None:
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, (str, list))
                                                    and not default)
                or "default" in (action.help or "").lower()):
            return None
        return "(default: " + _shown(default).replace("%", "%%") + ")"  # help is %-formatted

    def _get_help_string(self, action: argparse.Action) -> str:
        note = self._default_note(action)
        return f"{action.help} {note}" if note else action.help or ""

    def _format_action(self, action: argparse.Action) -> str:
        note = None if action.help else self._default_note(action)
        if note:  # argparse prints no help line for an option without help text
            action = copy.copy(action)
            action.help = note
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that forgets, once parsing ends, which once-only flags it saw."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        vars(parsed).pop(_GIVEN, None)
        return parsed, rest


def make_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser named after the command a user types, defaults shown in --help, with
    the --debug flag every command takes."""
    from tome_jax.cli.main import invoked_as  # "tome-jax sweep" under the tome-jax command

    parser = _Parser(prog=invoked_as(prog), description=description, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"on a user error, show the traceback instead of one error line "
                             f"(as {DEBUG_ENV}=1 does)")
    return parser


class OnceAction(argparse.Action):
    """Stores a flag's value(s); the flag given twice (under any of its names) is a parse error,
    so `--r 0 --r 8` cannot silently mean `--r 8`.

    renamed_to: set on a former name of the flag (hidden from --help); using it prints one
      warning line naming the new flag, then works as the new flag does.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *,
                 renamed_to: str | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.renamed_to = renamed_to

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        name = self.renamed_to or self.option_strings[-1]
        if self.renamed_to:
            print(f"{parser.prog}: warning: {option_string} is now {self.renamed_to}",
                  file=sys.stderr, flush=True)
        given = vars(namespace).setdefault(_GIVEN, {})
        if self.dest in given:
            if isinstance(values, list):
                fix = f"give all values after one {name}: {name} " + _shown(
                    [*given[self.dest], *values])
            else:
                fix = "it takes one value"
            # One line, like every user error: the fix is in it, the usage block adds nothing.
            parser.exit(2, f"{parser.prog}: error: {name} given twice; {fix}\n")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


def add_flag(parser: argparse.ArgumentParser | argparse._ActionsContainer, name: str, *,
             formerly: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(name, **kwargs)` as a once-only flag (`OnceAction`); each former
    name in `formerly` keeps working, hidden, with a warning line. `parser` may be a group."""
    action = parser.add_argument(name, action=OnceAction, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "required", "default")}
    for old in formerly:
        parser.add_argument(old, action=OnceAction, dest=action.dest, renamed_to=name,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def r_value(text: str) -> Schedule:
    """argparse type of one schedule: "8" -> 8, "8,-1" -> (8, -1.0), "[8,8,4]" -> per layer."""
    try:
        return parse_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_r(parser: argparse.ArgumentParser, *, many: bool, default: Any = None,
          required: bool = False, help: str | None = None) -> None:
    """--r: one schedule, or (many) several after one flag; each value parsed by `r_value`.
    Given twice, it is an error (`OnceAction`).

    Defaults given as text are parsed too, so `args.r` always holds schedules.
    """
    if many:
        default = [r_value(v) if isinstance(v, str) else v for v in default or []]
        add_flag(parser, "--r", type=r_value, nargs="+", default=default, required=required,
                 metavar="R", help=help or R_HELP + "; several to compare them")
    else:
        default = r_value(default) if isinstance(default, str) else default
        add_flag(parser, "--r", type=r_value, default=default, required=required,
                 metavar="R", help=help or R_HELP)


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

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError, CheckpointError)


def debugging(args: argparse.Namespace | None = None) -> bool:
    """Whether a user error shows its traceback: --debug, or TOME_JAX_DEBUG set (not to 0)."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(prog: str, error: BaseException) -> str | None:
    """The one line `PROG: error: ...` for a user error or a missing optional dependency; None
    for anything else (a bug: its traceback is wanted)."""
    if isinstance(error, ModuleNotFoundError):
        from tome_jax.cli.main import missing_extra  # kept there: `tome-jax --help` needs no JAX

        extra = missing_extra(error)
        return f"{prog}: error: needs {extra[0]}: {extra[1]}" if extra else None
    if isinstance(error, user_errors()):
        return f"{prog}: error: {one_line(str(error)) or type(error).__name__}"
    return None


def run(parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], Any],
        argv: Sequence[str] | None = None, *, status: bool = False) -> Any:
    """Parses argv and returns fn(args); a user error prints one `PROG: error:` line and exits
    2 (with `status`, returns 2: convert, vis and export return their exit status).

    --debug or TOME_JAX_DEBUG=1 gives the traceback instead.
    """
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except (ModuleNotFoundError, *user_errors()) as e:
        line = error_line(parser.prog, e)
        if line is None or debugging(args):
            raise
        print(line, file=sys.stderr, flush=True)
        if status:
            return 2
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

