"""experiments/colab_quickstart.ipynb: kept without outputs, and executed top to bottom on CPU
with a few steps per run (quickstart, plot, eval, samples, a two-stage growth run and its plot)."""

import os

import pytest

from conftest import REPO_ROOT
from jaxlm.training.saved_run import load_saved_run

NOTEBOOK = REPO_ROOT / "experiments" / "colab_quickstart.ipynb"
nbformat = pytest.importorskip("nbformat")


def test_the_notebook_is_kept_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow  # A minute or two; .ci/run runs the slow tests (with the notebook extra).
def test_the_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("JAXLM_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("JAXLM_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
  outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
  assert "steps per run: 4" in outputs and "perplexity" in outputs
  grown = load_saved_run(str(tmp_path / "runs" / "grown"))  # Its last checkpoint: the grown stage.
  assert grown.stage.name == "large" and grown.stage.model.num_layers == 4 and grown.step == 4
  figures = os.listdir(tmp_path / "runs" / "plots")
  assert "eval_loss.png" in figures
  images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # The quickstart's loss curve and the growth comparison.
