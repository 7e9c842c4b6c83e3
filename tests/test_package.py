"""The installable package: the `tome-jax` command, the packaged default, TensorFlow optional.

The fresh-virtual-environment check (the built wheel installed without TensorFlow, the quick
start run from an empty folder) is a step of `.ci/run`; here TensorFlow is hidden from a
subprocess instead (`sys.modules[name] = None` makes its import fail as if not installed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tome_jax import checkpoint, inputs
from tome_jax.assets import shipped_images_dir, shipped_model_dir
from tome_jax.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
HIDE_TF = "import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None)\n"
TFDS_HINT = 'needs TensorFlow: pip install "tome-jax[tfds]"'


def _python(code: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _without_tf(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`tome-jax ARGV` in a process where TensorFlow cannot be imported."""
    return _python(HIDE_TF + f"from tome_jax.cli.main import main\nsys.exit(main({argv!r}))",
                   cwd)


def test_import_tome_jax_does_not_import_tensorflow(tmp_path):
    code = ("import sys, tome_jax, tome_jax.cli.main, tome_jax.inputs, tome_jax.assets\n"
            "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in "
            "sys.modules, sorted(m for m in sys.modules if m.startswith('tensorflow'))")
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr


def test_library_imports_without_tensorflow(tmp_path):
    code = HIDE_TF + ("import tome_jax.vit, tome_jax.merge, tome_jax.evaluation, "
                      "tome_jax.memory_data, tome_jax.sweep, tome_jax.cli.sweep\n"
                      "from tome_jax import inputs\n"
                      "assert not inputs.has_tensorflow() and inputs.eval_split('x', None) == "
                      "'test'")
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr


def test_shipped_assets_are_package_data():
    model, images = shipped_model_dir(), shipped_images_dir()
    assert model.parent == images.parent == ROOT / "tome_jax" / "assets"
    assert checkpoint.is_model_dir(model) and (model / "MODEL_CARD.md").is_file()
    assert checkpoint.read_info(model).image_size == (32, 32)
    classes = sorted(p.name for p in (images / "test").iterdir())
    assert len(classes) == 10 and len(list(images.glob("test/*/*.jpg"))) == 1000
    # The checkout's old paths lead to the same folders.
    assert (ROOT / "models" / "cifar10_vit").resolve() == model.resolve()
    assert (ROOT / "data" / "cifar10-test-1000").resolve() == images.resolve()


def test_overview_names_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tome-jax [--debug] COMMAND")
    assert all(f"\n  {name} " in out for name in cli.COMMANDS)
    assert cli.main([]) == 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_has_its_own_help_under_its_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tome-jax {name}")
    # Outside the dispatcher the parser keeps its own name again.
    assert cli.invoked_as("python -m eval.sweep") == "python -m eval.sweep"


def test_unknown_command_and_version(capsys):
    assert cli.main(["swep"]) == 2
    assert "error: unknown command 'swep'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("tome-jax 0.")


def test_python_dash_m_tome_jax_is_the_same_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tome_jax", "sweep", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m tome_jax sweep")


def test_a_tfds_source_without_tensorflow_names_the_extra(tmp_path):
    done = _without_tf(["evaluate", "--data", "cifar10", "--variant", "mu/4",
                        "--image-size", "16"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(TFDS_HINT), done.stderr


def test_quickstart_runs_without_tensorflow_from_any_folder(tmp_path):
    done = _without_tf(["quickstart", "--r", "0", "--runs", "0", "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| - | 0 | 65 |" in done.stdout  # r = 0 keeps all 65 tokens
    assert (tmp_path / "runs" / "quickstart" / "cifar10_vit.csv").is_file()


def _labels(batches) -> list[int]:
    return sorted(int(y) for b in batches for y, m in zip(b["label"], b["mask"], strict=True)
                  if m)


def test_pil_and_tf_readers_give_the_same_split():
    pytest.importorskip("tensorflow_datasets")
    kw = dict(batch_size=300, image_size=32, data_dir=shipped_images_dir())
    pil = inputs.eval_input("image_folder", "test", reader="pil", **kw)
    tf = inputs.eval_input("image_folder", "test", reader="tf", **kw)
    assert (len(pil), pil.batch_size, pil.num_classes) == (len(tf), tf.batch_size, 10) == (
        4, 300, 10)
    assert _labels(pil) == _labels(tf) and len(_labels(pil)) == 1000
    first = next(iter(pil))
    assert first["image"].shape == (300, 32, 32, 3) and first["image"].dtype == "float32"
    assert first["index"].tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="cifar10", split="test"), "--data cifar10 " + TFDS_HINT),
    (dict(name="image_folder", split="test[:40]"), "split slice 'test[:40]' " + TFDS_HINT),
    (dict(name="image_folder", split="test", eval_crop=0.875), "--eval-crop 0.875 " + TFDS_HINT),
])
def test_the_pil_reader_refuses_what_only_tf_data_does(kwargs, message):
    with pytest.raises(inputs.NeedsTensorFlow, match=message.replace("[", r"\[")):
        inputs.eval_input(**kwargs, batch_size=8, image_size=32, reader="pil",
                          data_dir=shipped_images_dir())
    with pytest.raises(ValueError, match="unknown reader"):
        inputs.eval_input("image_folder", "test", batch_size=8, image_size=32, reader="jpeg")


@pytest.mark.slow
def test_wheel_holds_the_command_and_the_default_and_no_tensorflow(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "tome_jax", src / "tome_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("tome_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"tome_jax/cli/main.py", "tome_jax/__main__.py", "tome_jax/inputs.py",
            "tome_jax/assets/cifar10_vit/params.msgpack",
            "tome_jax/assets/cifar10_vit/config.json",
            "tome_jax/assets/cifar10_vit/MODEL_CARD.md"} <= names
    assert sum(n.startswith("tome_jax/assets/cifar10-test-1000/test/") for n in names) == 1000
    assert "tome-jax = tome_jax.cli.main:main" in entry
    core = [line for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not any("tensorflow" in line for line in core)
    assert "Project-URL: Repository, https://github.com/tome-jax/tome-jax" in meta
    # An SPDX expression (the TOML-table form is deprecated) and the licence text itself.
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.parametrize("module, flag", [("tome_jax.vis", "--normalization"),
                                          ("tome_jax.export", "--checkpoint")])
def test_library_module_entry_points(module, flag):
    """`python -m tome_jax.vis` / `tome_jax.export` run their command lines."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module}") and flag in proc.stdout

