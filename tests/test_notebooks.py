"""The notebooks in notebooks/ run top to bottom without error, and are committed with outputs.

Each notebook runs in a fresh ``python3`` kernel of the current environment (checked in the
kernel) with a temporary working directory; the notebooks write their own files under
``tempfile.mkdtemp()`` only, which the kernel resolves in a temporary ``TMPDIR`` of the test
(so no ``dgnh-quickstart-*`` or ``dgnh-cluster-*`` folder is left in the system's /tmp).

After changing a notebook (or an API it shows), refresh the committed outputs with::

    python tests/test_notebooks.py [quickstart applications remote_cluster]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["quickstart", "applications", "remote_cluster"]
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on 2 cores
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def execute(nb, cwd: str | os.PathLike, tmpdir: str | os.PathLike) -> None:
    """Run ``nb`` in place in a ``python3`` kernel started in ``cwd``; raises on a cell error.

    The kernel, and the Dask workers it starts, import this checkout's dgnh and make their
    temporary files under ``tmpdir`` (``TMPDIR``).
    """
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TMPDIR": str(tmpdir)}
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)


def tidy(nb) -> None:
    """What a Jupyter front end shows: consecutive stream outputs merged, a progress bar's
    carriage returns applied (its last state kept); no per-cell timing metadata."""
    for cell in code_cells(nb):
        cell.metadata.pop("execution", None)
        merged = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                lines = ANSI_ESCAPE.sub("", out.text).split("\n")
                out.text = "\n".join(([s for s in line.split("\r") if s.strip()] or [""])[-1]
                                     for line in lines)
        cell.outputs = merged


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
    """Every cell runs without error (nbclient raises CellExecutionError on the first)."""
    nb = read(name)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix  # this environment"))
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    execute(nb, cwd, tmpdir)
    cells = code_cells(nb)
    assert all(c.execution_count is not None for c in cells)
    assert [o for c in cells for o in c.outputs if o.output_type == "error"] == []
    assert list(cwd.iterdir()) == [], "notebooks must write only under their temp dir"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_outputs(name):
    """The committed notebook was executed top to bottom and holds its outputs, no errors."""
    nb = read(name)
    nbformat.validate(nb)
    cells = [c for c in code_cells(nb) if c.source.strip()]
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    assert sum(o.output_type == "stream" for o in outputs) >= 3
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters' holds the sizes"


@pytest.mark.parametrize("name, min_images", [("quickstart", 2), ("applications", 5)])
def test_committed_figures_are_png(name, min_images):
    nb = read(name)
    images = [o for c in code_cells(nb) for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= min_images


def main(argv: list[str] | None = None) -> int:
    """Execute the named notebooks (default: all) and save them with their outputs."""
    names = (sys.argv[1:] if argv is None else argv) or NOTEBOOKS
    for name in names:
        if name not in NOTEBOOKS:
            raise SystemExit(f"unknown notebook {name!r}: choose from {', '.join(NOTEBOOKS)}")
        nb = read(name)
        with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as tmpdir:
            execute(nb, cwd, tmpdir)
        tidy(nb)
        nbformat.write(nb, NOTEBOOK_DIR / f"{name}.ipynb")
        print(f"executed and saved notebooks/{name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
