"""tools/compute_to_target.py and tools/metric_at.py on runs they read from metrics.jsonl."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import compute_to_target  # noqa: E402  pylint: disable=wrong-import-position
import metric_at  # noqa: E402  pylint: disable=wrong-import-position


def _run(path, points):
  """A MODEL_DIR whose evaluations are (step, flops, loss)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step, flops, loss in points:
      f.write(json.dumps({"step": step, "total/flops": flops, "total/tokens": step * 10,
                          "eval/loss": loss}) + "\n")
  return str(path)


def test_compute_to_target_interpolates_the_crossing_and_reports_the_saving(tmp_path):
  base = _run(tmp_path / "base", [(0, 0.0, 5.0), (10, 100.0, 3.0), (20, 200.0, 2.0)])
  fast = _run(tmp_path / "fast", [(0, 0.0, 5.0), (10, 100.0, 2.5), (20, 200.0, 1.5)])
  slow = _run(tmp_path / "slow", [(0, 0.0, 5.0), (20, 200.0, 2.5)])
  assert compute_to_target.crossing([0, 100, 200], [5.0, 2.5, 1.5], 2.0) == pytest.approx(150.0)
  lines = compute_to_target.savings_table(base, {"fast": fast, "slow": slow},
                                          paper={"fast": "45%"})
  assert lines[0].startswith("Target: the baseline's final eval/loss = 2.0000 after 200")
  assert "| fast | 150 | 25.0% | 1.5000 | 45% |" in lines
  assert "| slow | not reached in 200 | - | 2.5000 | - |" in lines


def test_compute_to_target_bad_input_is_one_line(tmp_path, capsys):
  base = _run(tmp_path / "base", [(0, 0.0, 5.0)])
  assert compute_to_target.main([f"--baseline={base}", "nonsense"]) == 2
  assert capsys.readouterr().err.strip() == "error: 'nonsense': expected NAME=DIR"
  assert compute_to_target.main([f"--baseline={base}", "--paper=a45", f"a={base}"]) == 2
  assert capsys.readouterr().err.strip() == "error: --paper item 'a45': expected NAME:PERCENT"
  assert compute_to_target.main([f"--baseline={base}", "--metric=eval/x", f"a={base}"]) == 2
  assert "no eval/x in metrics.jsonl" in capsys.readouterr().err


def test_metric_at_reads_each_column_at_its_step(tmp_path, capsys):
  run = _run(tmp_path / "a", [(0, 0.0, 5.0), (10, 100.0, 3.0)])
  assert metric_at.main(["--at=10:eval/loss", "--at=5:eval/loss", f"a={run}"]) == 0
  assert capsys.readouterr().out.splitlines()[2] == "| a | 3.0000 | - |"
  assert metric_at.main(["--at=ten:eval/loss", f"a={run}"]) == 2
  assert "expected STEP:METRIC" in capsys.readouterr().err
  assert metric_at.main(["--at=10:eval/loss", f"={run}"]) == 2
  assert capsys.readouterr().err.strip() == f"error: '={run}': expected NAME=DIR"
