"""One command-line convention for every `tome-jax` subcommand (`tome_jax.cli.args`).

--help names the program the user typed and shows the defaults; `--r` takes its values after one
flag and a repeated flag is an error, never a silent last-wins; `--batch-size` / `--image-size`
everywhere, the former names still working with one warning line; a user error is one
`PROG: error:` line with exit status 2, its traceback only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

import pytest

from tome_jax import benchmark as bench
from tome_jax.cli import args as cli_args
from tome_jax.cli import main as cli

COMMANDS = sorted(cli.COMMANDS)
# The subcommands that take --r, and whether they take several schedules.
TAKES_R = {"quickstart": True, "evaluate": False, "sweep": True, "benchmark": True,
           "vis": True, "export": False, "paired": False, "table": True}


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"tome_jax.cli.{name}").build_parser()


def _shown_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """flag -> the "(default: ...)" text its help line must carry (where its help text does
    not already say what the default is)."""
    shown = {}
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or default in ("", [])
                or "default" in (action.help or "").lower()):
            continue
        shown[action.option_strings[-1]] = f"(default: {cli_args._shown(default)})"
    return shown


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_every_command_is_checked():
    assert set(COMMANDS) == {"quickstart", "evaluate", "sweep", "benchmark", "train", "ship",
                             "summary", "convert", "vis", "export", "paired", "table", "plots",
                             "parity"}
    assert {n for n in COMMANDS if "--r" in _parser(n)._option_string_actions} == set(TAKES_R)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_the_program_and_shows_the_defaults(name, capsys):
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tome-jax {name} [-h] [--debug]")
    flat = " ".join(out.split())  # help lines wrap anywhere
    for flag, text in _shown_defaults(_parser(name)).items():
        assert text in flat, (flag, text)
    assert "--debug" in flat and "(default: None)" not in flat and "(default: False)" not in flat


def test_help_shows_defaults_as_they_are_typed(capsys):
    assert _exit_code(["benchmark", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: 0 8 13 16 16,-1)" in flat and "--batch-size BATCH_SIZE [BATCH_SIZE ...] " \
        "batch sizes; one table each (default: 8)" in flat
    assert "--variant VARIANT (default: B/16)" in flat  # an option without help text too


@pytest.mark.parametrize("name", COMMANDS)
def test_outside_tome_jax_the_program_is_a_runnable_module(name):
    prog = _parser(name).prog
    assert prog.startswith("python -m ") and not prog.endswith(".py"), prog
    module = prog.removeprefix("python -m ")
    assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("name", sorted(TAKES_R))
def test_a_repeated_r_is_one_error_line(name, capsys):
    assert _exit_code([name, "--r", "0", "--r", "8"]) == 2
    out, err = capsys.readouterr()
    hint = "give all values after one --r: --r 0 8" if TAKES_R[name] else "it takes one value"
    assert out == "" and err == f"tome-jax {name}: error: --r given twice; {hint}\n"


@pytest.mark.parametrize("name", sorted(n for n, many in TAKES_R.items() if many))
def test_r_takes_several_values_after_one_flag(name):
    required = {"sweep": ["--random-init", "--data", "image_folder"], "table": ["A=a.csv"],
                "vis": ["image.png", "--checkpoint", "model"]}.get(name, [])
    args = _parser(name).parse_args([*required, "--r", "0", "4", "8,-1", "[2,2]"])
    assert args.r == [0, 4, (8, -1.0), [2, 2]]


def test_the_issue_example_keeps_every_r(capsys):
    """`sweep --r 0 --r 4 8` used to drop r = 0 silently."""
    assert _exit_code(["sweep", "--random-init", "--data", "image_folder", "--r", "0",
                       "--r", "4", "8"]) == 2
    assert capsys.readouterr().err == ("tome-jax sweep: error: --r given twice; give all "
                                       "values after one --r: --r 0 4 8\n")


def test_other_list_flags_are_given_once(capsys):
    assert _exit_code(["benchmark", "--dtype", "float32", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == ("tome-jax benchmark: error: --dtype given twice; give "
                                       "all values after one --dtype: --dtype float32 bfloat16\n")
    # A former name and the new one together are the same flag twice.
    assert _exit_code(["benchmark", "--batch-size", "1", "--batch", "8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("tome-jax benchmark: error: --batch-size given twice; give all values "
                       "after one --batch-size: --batch-size 1 8")


def test_benchmark_former_flags_warn_and_still_work(monkeypatch, capsys):
    seen = []

    def fake_benchmark(variant, batch, image_size, *rest, **options):
        seen.append((batch, image_size))
        return [dict(r=0, method="-", tokens=17, gflops=1.0, flops_speedup=1.0, im_s=1.0,
                     seconds=1.0, speedup=1.0, efficiency=1.0, compile_s=0.5, merge_s=0.0,
                     merge_share=0.0, dtype="float32")]

    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    assert cli.main(["benchmark", "--variant", "mu/4", "--batch", "1", "3", "--resolution",
                     "16", "--runs", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["tome-jax benchmark: warning: --batch is now --batch-size",
                                "tome-jax benchmark: warning: --resolution is now --image-size"]
    assert seen == [(1, 16), (3, 16)] and "ViT-mu/4 @ 16px, batch 3" in out
    # The new names: the same run, no warning.
    assert cli.main(["benchmark", "--variant", "mu/4", "--batch-size", "1", "3",
                     "--image-size", "16", "--runs", "1"]) == 0
    assert capsys.readouterr().err == "" and seen[2:] == seen[:2]


@pytest.mark.parametrize("name, old, new", [("benchmark", "--batch", "--batch-size"),
                                            ("benchmark", "--resolution", "--image-size"),
                                            ("export", "--batch", "--batch-size")])
def test_former_names_are_hidden_from_help(name, old, new, capsys):
    assert _exit_code([name, "--help"]) == 0
    words = capsys.readouterr().out.replace("[", " ").replace("]", " ").split()
    assert new in words and old not in words


def test_export_former_batch_flag_warns_and_parses(capsys):
    args = _parser("export").parse_args(["--checkpoint", "m", "--out", "o", "--batch", "3"])
    assert args.batch_size == 3
    assert capsys.readouterr().err == ("python -m tome_jax.export: warning: --batch is now "
                                       "--batch-size\n")
    assert _parser("export").parse_args(["--checkpoint", "m", "--out", "o"]).batch_size is None


@pytest.mark.parametrize("argv, message", [
    (["plots", "missing.csv", "out.png"], "No such file or directory: 'missing.csv'"),
    (["table", "A=missing.csv", "--r", "0"], "No such file or directory: 'missing.csv'"),
    (["table", "no-equals-sign", "--r", "0"], "'no-equals-sign' is not NAME=PATH.csv"),
    (["summary", "missing_workdir"], "missing_workdir"),
])
def test_user_errors_are_one_line_with_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli_args.DEBUG_ENV, raising=False)
    assert _exit_code(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"tome-jax {argv[0]}: error: ") and message in err


@pytest.mark.parametrize("name", ["vis", "export"])
def test_commands_returning_a_status_report_in_one_line(name, tmp_path, capsys):
    argv = {"vis": ["image.png", "--checkpoint", str(tmp_path), "--r", "4"],
            "export": ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m")]}[name]
    assert cli.main([name, *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"tome-jax {name}: error: ")
    assert "not a converted checkpoint" in err


def test_table_without_the_requested_r_is_a_user_error(tmp_path, capsys):
    from tome_jax.sweep import write_csv

    write_csv([{"strategy": "-", "r": "0", "tokens": 65, "gflops": 2.0, "im_s": 1.0}],
              tmp_path / "a.csv")
    assert _exit_code(["table", f"A={tmp_path / 'a.csv'}", "--r", "0", "11"]) == 2
    err = capsys.readouterr().err
    assert err == "tome-jax table: error: no tome row at r = 11 (the sweep has r in ['0'])\n"


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli_args.DEBUG_ENV, raising=False)
    argv = ["plots", "missing.csv", "out.png"]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match="missing.csv"):
            cli.main(debug_argv)
    monkeypatch.setenv(cli_args.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)
    monkeypatch.setenv(cli_args.DEBUG_ENV, "0")  # set to 0: off, as unset
    assert _exit_code(argv) == 2
    assert capsys.readouterr().err.startswith("tome-jax plots: error:")
