"Every notebook of nbs/ runs top to bottom (small sample, one epoch); a failing cell fails the suite."
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parents[1] / "nbs"
NOTEBOOKS = sorted(NBS.glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"00_data.ipynb", "01_train.ipynb", "02_compare.ipynb"} <= {p.name for p in NOTEBOOKS}


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FRACTURE_FASTAI_SMOKE", "1")
    monkeypatch.setenv("FRACTURE_FASTAI_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FRACTURE_FASTAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    # The kernel starts in nbs/, as a researcher's would, so the notebooks' relative paths hold.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NBS)}}).execute()
