"""The `tome-jax` command: one program, a subcommand per tool (`python -m tome_jax` is the same).

    tome-jax quickstart                 # the shipped model on the shipped images, any folder
    tome-jax sweep --help               # each subcommand's own options
    tome-jax --debug sweep ...          # a user error with its traceback (= sweep ... --debug)
    tome-jax --version

Each subcommand runs `tome_jax.cli.<name>.main(argv)`, the function behind `python -m eval.X` /
`python -m train.X` in a checkout, with its parser named after what the user typed
(`invoked_as`). A subcommand whose optional dependency is missing (TensorFlow for tfds sources,
PyTorch for the timm comparisons) says in one line what to install.
"""

from __future__ import annotations

import contextvars
import importlib
import sys
from collections.abc import Sequence

# name -> one line for the overview (kept here so `tome-jax --help` imports no JAX).
COMMANDS = {
    "quickstart": "ToMe on the shipped CIFAR-10 ViT and 1,000 test images (offline)",
    "evaluate": "sharded top-1 / top-5 evaluation at one r",
    "sweep": "accuracy (or feature fidelity) against cost over r and strategies",
    "benchmark": "throughput of ToMe schedules against the FLOPs limit",
    "train": "train or fine-tune a ViT with ToMe merging",
    "ship": "a training workdir's newest checkpoint -> a model directory",
    "summary": "a table of training runs from their metrics",
    "convert": "a ViT checkpoint (.npz, PyTorch, safetensors, ONNX) -> a model directory",
    "vis": "paint ToMe's merged patch groups over an image",
    "export": "a merged ViT -> a jax.export artefact",
    "paired": "paired comparison of models on the same images",
    "table": "one Markdown table from several sweep CSVs",
    "plots": "redraw a sweep's plot from its CSV",
    "parity": "our ViT's parity with timm on the same random weights",
}
# Missing top-level module -> what to install.
EXTRAS = {
    "tensorflow": ("TensorFlow", 'pip install "tome-jax[tfds]"'),
    "tensorflow_datasets": ("TensorFlow", 'pip install "tome-jax[tfds]"'),
    "torch": ("PyTorch and timm", 'pip install "tome-jax[test]"'),
    "timm": ("PyTorch and timm", 'pip install "tome-jax[test]"'),
}

_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("tome_jax_prog",
                                                                  default=None)


def invoked_as(default: str) -> str:
    """The program name of the running subcommand ("tome-jax sweep"), else `default`."""
    return _PROG.get() or default


def usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} [--debug] COMMAND [options]   ({prog} COMMAND --help for its "
             "options)",
             "", "Token Merging (ToMe) for Vision Transformers in JAX/Flax.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def missing_extra(error: ModuleNotFoundError) -> tuple[str, str] | None:
    """(what, install command) when `error` is an optional dependency that is not installed."""
    return EXTRAS.get((error.name or "").partition(".")[0])


def main(argv: Sequence[str] | None = None, prog: str = "tome-jax") -> int:
    """Runs `prog [--debug] COMMAND ARGS...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    if debug:  # the subcommand's own --debug (tome_jax.cli.args.run)
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0 if argv else 2
    if argv[0] == "--version":
        from tome_jax import __version__

        print(f"{prog} {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"{usage(prog)}\n\n{prog}: error: unknown command {name!r}", file=sys.stderr)
        return 2
    token = _PROG.set(f"{prog} {name}")
    try:
        result = importlib.import_module(f"tome_jax.cli.{name}").main(
            ["--debug", *argv[1:]] if debug else argv[1:])
    except ModuleNotFoundError as e:  # an import the subcommand needs before it parses
        from tome_jax.cli.args import debugging

        extra = missing_extra(e)
        if extra is None or debug or debugging():
            raise
        print(f"{prog} {name}: error: needs {extra[0]}: {extra[1]}", file=sys.stderr)
        return 2
    finally:
        _PROG.reset(token)
    # convert, vis and export return their exit status; the others return results.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
