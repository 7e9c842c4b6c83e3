"""The notebooks in notebooks/: committed without outputs, self-installing, and each one runs
top to bottom against the installed package, never this checkout.

The default run checks the committed files: no outputs, a first code cell that installs
tome-jax from the repository URL in pyproject.toml's [project.urls] when it does not import,
and nothing that assumes a checkout (a clone, `sys.path` edits, files read from the
repository's folders).

`python -m pytest -m notebooks` executes them with nbclient in a kernel started with the python
named by $TOME_JAX_NOTEBOOK_PYTHON: a virtual environment where the built wheel is installed
with its `notebooks` extra (`.ci/run` makes one and sets the variable). Each notebook runs in an
empty folder, with the Hugging Face Hub offline (its optional DINOv2 section then says why it
skips), and the test checks that the kernel imported tome_jax from that environment, not from
this checkout, and that the notebook left nothing in its folder. Without the variable these
tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_visualise_merges.ipynb",
            "03_finetune_with_merging.ipynb", "04_dtem.ipynb"]
PYTHON_VAR = "TOME_JAX_NOTEBOOK_PYTHON"
KERNEL = "tome-jax-notebooks"
CELL_TIMEOUT_S = 300
STRIP_HINT = "run `python notebooks/strip_outputs.py` before committing"
# Text that only makes sense inside a checkout (or on one machine), with why it is refused.
CHECKOUT_ONLY = {
    "git clone": "a notebook installs the package, it does not clone the repository",
    "sys.path": "the installed package is imported as it is, no path edits",
    "os.chdir": "a notebook runs from any folder",
    "shared_dir": "the project's shared folder exists only beside a checkout",
    "../shared": "the project's shared folder exists only beside a checkout",
    "models/cifar10_vit": "the shipped model is tome_jax.assets.shipped_model_dir()",
    "data/cifar10-test-1000": "the shipped images are tome_jax.assets.shipped_images_dir()",
    "train/configs": "the training configs are not part of the package",
    "python -m train.": "the installed command is `tome-jax`",
    "python -m eval.": "the installed command is `tome-jax`",
    "/work/": "a machine path",
    "/root/": "a machine path",
}
# Words about how the project was made, which a user's notebook has no business saying.
PROCESS_WORDS = re.compile(r"\b(sessions?|work periods?|dev(elopment)? machines?|lent|borrowed)\b",
                           re.IGNORECASE)


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def repository_url() -> str:
    """[project.urls] Repository of pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one line is enough
        match = re.search(r'^Repository\s*=\s*"([^"]+)"', text, re.MULTILINE)
        assert match, "pyproject.toml has no [project.urls] Repository"
        return match.group(1)
    return tomllib.loads(text)["project"]["urls"]["Repository"]


def test_all_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", path.name
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [], f"{path.name} cell {i} has outputs; {STRIP_HINT}"
        assert cell["execution_count"] is None, (
            f"{path.name} cell {i} has an execution count; {STRIP_HINT}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_installs_from_the_project_url(path):
    first = next(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    assert f'"tome-jax @ git+{repository_url()}"' in first, first
    # Only where tome_jax does not import, so an installed package (CI) reaches no network.
    assert "import tome_jax" in first and "except ImportError" in first, first
    assert first.index("import tome_jax") < first.index("pip"), first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nothing_assumes_a_checkout(path):
    for i, cell in enumerate(_cells(path)):
        text = _source(cell)
        for needle, why in CHECKOUT_ONLY.items():
            assert needle not in text, f"{path.name} cell {i} has {needle!r}: {why}"
        if cell["cell_type"] == "markdown":
            found = PROCESS_WORDS.search(text)
            assert not found, f"{path.name} cell {i} says {found.group(0)!r}"


# ------------------------------------------------------------------------------------------
# Execution in the installed package's environment (-m notebooks).


@pytest.fixture(scope="module")
def kernel_python() -> tuple[Path, Path]:
    """(the python of $TOME_JAX_NOTEBOOK_PYTHON, its sys.prefix)."""
    value = os.environ.get(PYTHON_VAR)
    if not value:
        pytest.skip(f"{PYTHON_VAR} is not set: set it to the python of a virtual environment "
                    "with the built wheel installed with its notebooks extra "
                    "(pip install 'tome_jax-*.whl[notebooks]'), as .ci/run does")
    python = Path(value)
    if not python.is_file():
        pytest.fail(f"{PYTHON_VAR}={value} is not a file")
    prefix = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], check=True,
                            capture_output=True, text=True, cwd="/").stdout.strip()
    return python, Path(prefix).resolve()


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory, kernel_python) -> Path:
    """A folder of one kernelspec, KERNEL, that runs ipykernel on that python."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    spec = {"argv": [str(kernel_python[0]), "-m", "ipykernel_launcher",
                     "-f", "{connection_file}"],
            "display_name": "tome-jax (installed wheel)", "language": "python",
            # No way to this checkout through the environment; the Hub offline, so the
            # optional DINOv2 section skips instead of downloading.
            "env": {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}}
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return kernels


def _nbclient():
    """(nbformat, NotebookClient, AsyncKernelManager, KernelSpecManager); a clear failure,
    not a skip, when they are missing."""
    try:
        import nbformat
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager
        from nbclient import NotebookClient
    except ImportError as e:
        pytest.fail(f"executing the notebooks needs nbclient and nbformat on the test side "
                    f"(pip install -e '.[test]'): {e}")
    return nbformat, NotebookClient, AsyncKernelManager, KernelSpecManager


PROBE = """\
import json, sys, tome_jax
print(json.dumps({"prefix": sys.prefix, "tome_jax": tome_jax.__file__}))"""


def _run_with_probe(nb, kernel_dir: Path, cwd: Path) -> dict:
    """Executes nb (plus a last cell that reports where tome_jax came from) in the installed
    environment's kernel, from cwd; returns the probe's report."""
    nbformat, NotebookClient, AsyncKernelManager, KernelSpecManager = _nbclient()
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    km = AsyncKernelManager(kernel_name=KERNEL,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    errors = [o for cell in nb.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    return json.loads(printed.splitlines()[-1])


def _check_installed(report: dict, prefix: Path) -> None:
    module = Path(report["tome_jax"]).resolve()
    assert not module.is_relative_to(REPO), (
        f"the kernel imported tome_jax from this checkout ({module}), not the installed wheel")
    assert Path(report["prefix"]).resolve() == prefix, report
    assert module.is_relative_to(prefix), (
        f"tome_jax came from {module}, outside {PYTHON_VAR}'s environment {prefix}")


@pytest.mark.notebooks
def test_kernel_imports_the_installed_package(kernel_python, kernel_dir, tmp_path):
    nbformat = _nbclient()[0]
    report = _run_with_probe(nbformat.v4.new_notebook(), kernel_dir, tmp_path)
    _check_installed(report, kernel_python[1])
    assert Path(sys.prefix).resolve() != kernel_python[1], (
        f"{PYTHON_VAR} is the test environment itself; it must be a separate one")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_python, kernel_dir, tmp_path):
    nbformat = _nbclient()[0]
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    report = _run_with_probe(nb, kernel_dir, tmp_path)
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    _check_installed(report, kernel_python[1])
    assert list(tmp_path.iterdir()) == [], (
        f"{path.name} left files in the folder it ran from (cleanup cells remove theirs)")
