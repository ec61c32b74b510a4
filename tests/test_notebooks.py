"""The notebooks in notebooks/ run top to bottom without error, and are committed with outputs.

Each notebook runs in a fresh ``python3`` kernel of the current environment (checked in the
kernel), with a temporary working directory; the notebooks write their own files under
``tempfile.mkdtemp()`` only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["quickstart", "applications", "remote_cluster"]
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on 2 cores


def read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    """Every cell runs without error (nbclient raises CellExecutionError on the first)."""
    nb = read(name)
    # the kernel (and the Dask workers it starts) import this checkout's dgnh
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    check = nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix  # this environment's kernel")
    nb.cells.insert(0, check)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    cells = code_cells(nb)
    assert all(c.execution_count is not None for c in cells)
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert list(tmp_path.iterdir()) == [], "notebooks must write only under their temp dir"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_outputs(name):
    """The committed notebook was executed in order, holds its outputs, and no errors."""
    nb = read(name)
    nbformat.validate(nb)
    cells = [c for c in code_cells(nb) if c.source.strip()]
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "execute the notebook top to bottom"
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "stream" for o in outputs) >= 3
    parameters = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, "one cell tagged 'parameters' holds the sizes"


@pytest.mark.parametrize("name, min_images", [("quickstart", 2), ("applications", 5)])
def test_committed_figures_are_png(name, min_images):
    nb = read(name)
    images = [o for c in code_cells(nb) for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= min_images
