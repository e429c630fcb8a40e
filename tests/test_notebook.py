"""notebooks/quickstart.ipynb executes top to bottom on CPU (its last cell asserts that reloaded logits match).

The notebook trains 150 steps (the fewest that still show several reductions); the cell timeout only guards against
a hang, it is no speed requirement."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the [test] extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="install the [test] extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="install the [test] extra: pip install -e '.[test]'")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_HANG_GUARD_S = 1800


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # A kernel spec for *this* interpreter, so the notebook runs in the environment under test (a system-wide
    # "python3" kernel could point to another Python).
    spec_dir = tmp_path / "jupyter" / "kernels" / "compressm-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "compressm test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # one torch thread in the kernel unless the caller chose: the default (one per core) crawls on a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="compressm-test", timeout=CELL_HANG_GUARD_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "test accuracy" in text
    assert "reloaded state dims:" in text and "max |logit difference|: 0.0" in text
    dims_line = next(line for line in text.splitlines() if line.startswith("state dims:") and "->" in line)
    before, after = dims_line.split(":", 1)[1].split("->")
    assert sum(json.loads(after)) < sum(json.loads(before))  # the callback reduced the model
    assert len(re.findall(r"^step +\d+: \[", text, re.M)) >= 2  # the history cell lists several reduction events
    assert any(output.get("output_type") == "display_data" and "image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
