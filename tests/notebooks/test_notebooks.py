"""The research notebooks run end to end: each is executed with nbclient in small mode
(``JQ_NOTEBOOK_SMALL=1``: tiny shapes, a truncated SmolLM2, few tokens) on whatever JAX backend
the test machine has, and any cell error fails the test.

The notebooks' committed outputs come from a full-size run; this test never writes them back.
It needs ``nbformat``, ``nbclient`` and ``ipykernel`` (a ``python3`` kernel from this
interpreter) and ``matplotlib``; without them it is skipped with a message.
"""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (dev extra)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (dev extra)")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (dev extra)")
pytest.importorskip("matplotlib", reason="notebook tests need matplotlib (dev extra)")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"01_quickstart.ipynb", "02_ptq_study.ipynb", "03_kernels_and_scale.ipynb"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", [
    # 02 evaluates a 49k-vocabulary model many times: compiled fully optimized (tests/conftest.py)
    pytest.param(p, marks=[pytest.mark.optimized] if p.stem == "02_ptq_study" else [])
    for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, monkeypatch):
  monkeypatch.setenv("JQ_NOTEBOOK_SMALL", "1")
  # each notebook picks its own devices (03 asks for 8 virtual CPU devices): only the suite's
  # compile flags (tests/spawn.py), not ours
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  flags = spawn.xla_flags()
  if flags:
    monkeypatch.setenv("XLA_FLAGS", flags)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed in small mode:\n{e}", pytrace=False)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
