"""The notebooks in notebooks/: committed without outputs, and each one runs top to bottom.

Execution uses nbclient with the `python3` kernel, which jupyter_client starts with this
interpreter (`sys.executable`), so the notebooks see the same environment as the tests. The
notebooks locate the repository root themselves (they run from notebooks/ here).
"""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_visualise_merges.ipynb",
            "03_finetune_with_merging.ipynb", "04_dtem.ipynb"]
CELL_TIMEOUT_S = 300
STRIP_HINT = "run `python notebooks/strip_outputs.py` before committing"


def _nbclient():
    """(nbformat, NotebookClient); a clear failure, not a skip, when they are missing."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        pytest.fail(f"executing the notebooks needs nbclient, nbformat and ipykernel "
                    f"(pip install -e '.[test]'): {e}")
    return nbformat, NotebookClient


def _run(nb, NotebookClient):
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    return nb


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


@pytest.mark.notebooks
def test_kernel_runs_this_environment():
    nbformat, NotebookClient = _nbclient()
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    _run(nb, NotebookClient)
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert printed == sys.prefix, (
        f"the python3 kernel runs in {printed}, not in this environment ({sys.prefix}): a "
        "python3 kernelspec of another environment shadows it (see `jupyter kernelspec list`)")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nbformat, NotebookClient = _nbclient()
    nb = nbformat.read(path, as_version=4)
    _run(nb, NotebookClient)
    errors = [o for cell in nb.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
