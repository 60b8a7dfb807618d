"""tools/compute_to_target.py, tools/metric_at.py and tools/plot_tradeoff.py on runs they read
from metrics.jsonl."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import compute_to_target  # noqa: E402  pylint: disable=wrong-import-position
import metric_at  # noqa: E402  pylint: disable=wrong-import-position
import plot_tradeoff  # noqa: E402  pylint: disable=wrong-import-position


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
  lines = compute_to_target.savings_table(base, {"fast": [fast], "slow": slow},
                                          paper={"fast": "45%"}, smooth_k=1)
  assert lines[0].startswith("Target: the baseline's smoothed final eval/loss = 2.0000 (n=1) "
                             "after 200 FLOPs")
  assert "| fast | 150 (n=1) | 25.0% (n=1) | 1.5000 (n=1) | 45% |" in lines
  assert "| slow | not reached in 200 | - | 2.5000 (n=1) | - |" in lines


def test_smoothing_leaves_a_straight_line_and_takes_the_noise_out_of_the_crossing():
  xs = np.linspace(0.0, 1000.0, 101)
  np.testing.assert_allclose(compute_to_target.smooth(xs, 3.0 - xs / 500, k=5), 3.0 - xs / 500)
  # A loss 3 - x/500 crossing 1.6 at x = 700, with noise (s.d. 0.05) in 20 draws: the first raw
  # dip below 1.6 comes early; the default smoothing (5 evaluations) all but removes that bias.
  raw, smoothed = [], []
  for seed in range(20):
    noisy = 3.0 - xs / 500 + np.random.default_rng(seed).normal(0.0, 0.05, xs.shape)
    raw.append(compute_to_target.crossing(xs, noisy, 1.6))
    smoothed.append(compute_to_target.crossing(xs, compute_to_target.smooth(xs, noisy), 1.6))
  assert np.mean(raw) < 690
  assert abs(np.mean(smoothed) - 700) < abs(np.mean(raw) - 700) / 4


def test_compute_to_target_reports_the_saving_over_seeds(tmp_path, capsys):
  """Straight curves (unchanged by smoothing): the baseline seeds end at 2.0 and 2.2 (target
  2.1, budget 200 FLOPs); the arm's seeds reach 2.1 at 100, 140 and never."""
  bases = [_run(tmp_path / f"b{i}", [(0, 0.0, 4.0), (10, 100.0, 4.0 - d), (20, 200.0, 4.0 - 2 * d)])
           for i, d in enumerate((1.0, 0.9))]
  arm = [_run(tmp_path / "a0", [(0, 0.0, 4.1), (10, 100.0, 2.1), (20, 200.0, 0.1)]),
         _run(tmp_path / "a1", [(0, 0.0, 3.5), (10, 100.0, 2.5), (20, 200.0, 1.5)]),
         _run(tmp_path / "a2", [(0, 0.0, 4.0), (10, 100.0, 3.5), (20, 300.0, 2.5)])]
  plot = tmp_path / "plots" / "to_target.png"
  assert compute_to_target.main([f"--baseline={bases[0]},{bases[1]}", f"arm={','.join(arm)}",
                                 f"never={arm[2]},{arm[2]}", f"--plot={plot}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "2.1000 (mean over n=2 seeds) after 200 FLOPs" in lines[0]
  assert lines[4] == ("| arm | 120 ± 28.3 (n=2); 1 of 3 seeds not reached in 300 | "
                      "40.0% ± 14.1% (n=2) | 1.3667 ± 1.2055 (n=3) | - |")
  assert lines[5] == "| never | not reached in 300 (all 2 seeds) | - | 2.5000 ± 0.0000 (n=2) | - |"
  assert lines[-1] == str(plot)  # Its own line: tools/reproduce.py shows it as the image.
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_to_target_names_the_baseline_and_the_y_axis_as_asked(tmp_path):
  xs, ys = np.array([0.0, 100.0, 200.0]), np.array([3.0, 2.5, 2.0])
  fig = compute_to_target.plot_curves(str(tmp_path / "p.png"), [
      ("AdamW", [(xs, ys, ys)], []), ("Muon", [(xs, ys - 0.5, ys - 0.5)], [100.0])],
      2.0, "eval/wiki/loss", "tokens", y_label="held-out loss (nats/byte)")
  ax = fig.axes[0]
  assert ax.get_ylabel() == "held-out loss (nats/byte)"
  assert "down to AdamW's final value" in ax.get_title()
  assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["AdamW", "Muon"]


def test_compute_to_target_counts_a_branch_from_its_branch_point(tmp_path):
  stable = _run(tmp_path / "stable", [(0, 0.0, 4.0), (10, 100.0, 3.0), (20, 200.0, 2.0)])
  decay = _run(tmp_path / "decay", [(0, 0.0, 3.0), (5, 50.0, 2.0), (10, 100.0, 1.0)])
  with open(os.path.join(decay, "restore_report.json"), "w", encoding="utf-8") as f:
    json.dump({"source": stable, "step": 10}, f)  # Branched at 100 FLOPs of the stable run.
  lines = compute_to_target.savings_table(stable, {"decay": [decay]}, smooth_k=1)
  assert lines[4].startswith("| decay | 150 (n=1) | 25.0% (n=1) |")


def test_compute_to_target_bad_input_is_one_line(tmp_path, capsys):
  base = _run(tmp_path / "base", [(0, 0.0, 5.0)])
  assert compute_to_target.main([f"--baseline={base}", "nonsense"]) == 2
  assert capsys.readouterr().err.strip() == "error: 'nonsense': expected NAME=DIR[,DIR...]"
  assert compute_to_target.main([f"--baseline={base}", "a="]) == 2
  assert capsys.readouterr().err.strip() == "error: 'a=': expected NAME=DIR[,DIR...]"
  assert compute_to_target.main([f"--baseline={base},", f"a={base}"]) == 2
  assert capsys.readouterr().err.strip() == f"error: --baseline='{base},': expected DIR[,DIR...]"
  assert compute_to_target.main([f"--baseline={base}", f"a={base},{tmp_path}"]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {tmp_path}: no metrics.jsonl (is it a MODEL_DIR?)")
  assert compute_to_target.main([f"--baseline={base}", "--paper=a45", f"a={base}"]) == 2
  assert capsys.readouterr().err.strip() == "error: --paper item 'a45': expected NAME:PERCENT"
  assert compute_to_target.main([f"--baseline={base}", "--metric=eval/x", f"a={base}"]) == 2
  assert "no eval/x in metrics.jsonl" in capsys.readouterr().err
  assert compute_to_target.main([f"--baseline={base}", "--smooth=0", f"a={base}"]) == 2
  assert "--smooth=0: give a number of evaluations >= 1" in capsys.readouterr().err
  assert compute_to_target.main([f"--baseline={base}", "--plot=out.svg", f"a={base}"]) == 2
  assert "--plot='out.svg': give a path ending in .png" in capsys.readouterr().err


def test_metric_at_reads_each_column_at_its_step(tmp_path, capsys):
  run = _run(tmp_path / "a", [(0, 0.0, 5.0), (10, 100.0, 3.0)])
  assert metric_at.main(["--at=10:eval/loss", "--at=5:eval/loss", f"a={run}"]) == 0
  assert capsys.readouterr().out.splitlines()[2] == "| a | 3.0000 | - |"
  assert metric_at.main(["--at=ten:eval/loss", f"a={run}"]) == 2
  assert "expected STEP:METRIC" in capsys.readouterr().err
  assert metric_at.main(["--at=10:eval/loss", f"={run}"]) == 2
  assert capsys.readouterr().err.strip() == f"error: '={run}': expected NAME=DIR[,DIR...]"
  assert metric_at.main(["--at=10:eval/loss", f"a={run},{tmp_path / 'none'}"]) == 2
  assert "none: no metrics.jsonl" in capsys.readouterr().err


def test_metric_at_gives_the_mean_over_seeds(tmp_path, capsys):
  seeds = [_run(tmp_path / f"s{i}", [(0, 0.0, 5.0), (10, 100.0, loss)])
           for i, loss in enumerate((3.0, 3.2))]
  late = _run(tmp_path / "late", [(0, 0.0, 5.0), (20, 200.0, 2.0)])  # Logged no step 10.
  assert metric_at.main(["--at=10:eval/loss", f"two={','.join(seeds)}",
                         f"gap={seeds[0]},{late}"]) == 0
  assert capsys.readouterr().out.splitlines()[2:] == ["| two | 3.1000 ± 0.1414 (n=2) |",
                                                     "| gap | 3.0000 (n=1) |"]


def _memory_run(path, loss, params, state):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"step": 0, "memory/param_bytes": params,
                        "memory/optimizer_state_bytes": state}) + "\n")
    f.write(json.dumps({"step": 10, "eval/loss": loss}) + "\n")
  return str(path)


def test_plot_tradeoff_puts_each_arm_at_its_summed_bytes_with_its_spread(tmp_path, capsys):
  big = [_memory_run(tmp_path / f"big{i}", loss, 2**21, 2**22) for i, loss in enumerate((3, 3.2))]
  small = _memory_run(tmp_path / "small", 3.5, 2**20, 2**20)
  running = tmp_path / "running"  # Started, nothing final logged yet.
  running.mkdir()
  (running / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
  out = tmp_path / "plots" / "tradeoff.png"
  args = ["--y=eval/loss", "--x=memory/param_bytes+memory/optimizer_state_bytes",
          f"--out={out}", f"big={','.join(big)}", f"small={small}", f"running={running}"]
  assert plot_tradeoff.main(args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[2] == "| big | 6.00 ± 0 | 3.1000 ± 0.14 | 2 |"
  assert lines[3] == "| small | 2.00 ± 0 | 3.5000 ± 0 | 1 |"
  assert "Not finished yet: running." in lines and lines[-1] == str(out) and out.exists()
  assert plot_tradeoff.main(["--y=eval/nothing", "--x=memory/param_bytes", f"--out={out}",
                             f"small={small}"]) == 2
  assert capsys.readouterr().err.strip() == ("error: no run has logged eval/nothing and "
                                             "memory/param_bytes yet")
