"""tools/plot_runs.py: the metrics reader (duplicate steps, x axes), the PNGs it writes for
synthetic runs (seeds' mean and band, y range, units, branches, forgetting only after a stage),
and its bad-input errors (one line on stderr, exit 2)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, load_tool

pytest.importorskip("matplotlib")

from jaxlm.reports import plots as report_plots  # noqa: E402  pylint: disable=wrong-import-position
from jaxlm.reports import runs as report_runs  # noqa: E402  pylint: disable=wrong-import-position


plot_runs_cli = load_tool("plot_runs")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path, records):
  path.mkdir(parents=True)
  lines = [json.dumps(r) for r in records]
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _records(scale=1.0, forgetting=True, resumed=False):
  """Train records every step, eval (and forgetting) every 2 steps; tokens 100/step."""
  out = []
  for step in range(1, 7):
    total = {"total/tokens": 100.0 * step, "total/flops": 1e9 * step}
    out.append({"step": step, "train/loss": scale * (5 - 0.5 * step),
                "train/learning_rate": 1e-3 * step, "perf/tokens_per_sec": 1000.0 + step, **total})
    if step % 2 == 0:
      ev = {"eval/code/loss": 4.0 - 0.1 * step, "eval/prose/loss": 4.5 - 0.1 * step,
            "eval/loss": 4.25 - 0.1 * step}
      if forgetting:
        ev.update({"forgetting/code": 0.01 * step, "forgetting/prose": 0.02 * step,
                   "forgetting/all": 0.015 * step})
      out.append({"step": step, **ev, **total})
    if resumed and step == 4:  # Killed after step 4's checkpoint, resumed: step 4 logged again.
      out.append({"step": 4, "train/loss": 99.0, **total})
  return out


def _restored_from(run, source, step):
  """What jaxlm.checkpointing.restore writes into a run that started from another run's checkpoint."""
  (run / "restore_report.json").write_text(json.dumps({"source": str(source), "step": step}))
  return run


@pytest.fixture
def runs(tmp_path):
  # run_a continued from a checkpoint that is not on this disk: its forgetting is plotted, from 0.
  a = _restored_from(_write_run(tmp_path / "run_a", _records(resumed=True)),
                     tmp_path / "gone", 100)
  b = _write_run(tmp_path / "run_b", _records(scale=1.1, forgetting=False))
  return a, b


def test_reader_series_duplicates_and_x_axes(runs):
  a, _ = runs
  series = report_runs.read_metrics(str(a))
  xs, ys = series["train/loss"]
  assert xs == [1, 2, 3, 4, 5, 6]
  assert ys[3] == 99.0  # The resumed run's later record of step 4 wins.
  assert ys[:3] == [4.5, 4.0, 3.5]
  assert series["eval/code/loss"] == ([2, 4, 6], pytest.approx([3.8, 3.6, 3.4]))
  assert "step" not in series
  by_tokens = report_runs.read_metrics(str(a), x="tokens")
  assert by_tokens["train/loss"][0] == [100, 200, 300, 400, 500, 600]
  assert by_tokens["forgetting/prose"][0] == [200, 400, 600]
  assert report_runs.read_metrics(str(a), x="flops")["perf/tokens_per_sec"][0][-1] == 6e9


def test_reader_skips_a_cut_off_last_line(tmp_path):
  run = _write_run(tmp_path / "r", _records())
  with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7, "train/lo')
  assert report_runs.read_metrics(str(run))["train/loss"][0][-1] == 6


def _assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def test_cli_writes_every_plot(runs, tmp_path, capsys):
  a, b = runs
  out = tmp_path / "plots"
  assert plot_runs_cli.main([f"base={a}", str(b), "--x=tokens", f"--out={out}",
                         "--target=eval/loss:3.8"]) == 0
  expected = ["train_loss", "eval_loss", "learning_rate", "throughput", "forgetting"]
  assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.png" for s in expected)
  for stem in expected:
    _assert_png(out / f"{stem}.png")
  assert capsys.readouterr().out.split() == [str(out / f"{s}.png") for s in expected]


def test_plot_runs_skips_missing_metrics(tmp_path):
  records = [{k: v for k, v in r.items() if not k.startswith(("eval/", "forgetting/"))}
             for r in _records()]
  a = _write_run(tmp_path / "a", records)
  b = _write_run(tmp_path / "b", [r for r in records if "perf/tokens_per_sec" not in r])
  paths = report_plots.plot_runs({"a": [str(a)], "b": [str(b)]}, str(tmp_path / "out"), x="flops")
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
      "learning_rate.png", "throughput.png", "train_loss.png"]


def _eval_run(path, losses, steps=None, bytes_per_token=1.0):
  """A run evaluated at `steps` (default 0, 10, 20, ...); 100 tokens per step."""
  steps = steps or [10 * i for i in range(len(losses))]
  return str(_write_run(path, [
      {"step": s, "total/tokens": 100.0 * s, "total/flops": 1e9 * s, "eval/loss": y,
       "eval/bits_per_byte": y / np.log(2) / bytes_per_token} for s, y in zip(steps, losses)]))


def test_seeds_are_drawn_as_their_mean_and_a_band(tmp_path):
  seeds = [_eval_run(tmp_path / "s0", [5.0, 3.0, 2.0, 1.9]),
           _eval_run(tmp_path / "s1", [5.2, 3.2, 2.2, 2.1])]
  one = _eval_run(tmp_path / "one", [5.1, 3.1, 2.1, 2.05])
  fig = report_plots.figures({"method": seeds, "single": [one]}, x="tokens",
                          targets={"eval/loss": 2.02})["eval_loss"]
  ax = fig.axes[0]
  lines = {line.get_label(): line for line in ax.lines}
  assert set(lines) == {"method (n=2)", "single", "target 2.02"}
  np.testing.assert_allclose(lines["method (n=2)"].get_xdata(), [0, 1000, 2000, 3000])
  np.testing.assert_allclose(lines["method (n=2)"].get_ydata(), [5.1, 3.1, 2.1, 2.0])
  np.testing.assert_allclose(lines["target 2.02"].get_ydata(), [2.02, 2.02])
  band = ax.collections[0].get_paths()[0].vertices[:, 1]  # Mean +- the sample s.d., 0.1414.
  assert band.max() == pytest.approx(5.1 + 0.02 ** 0.5) and band.min() == pytest.approx(
      2.0 - 0.02 ** 0.5)
  assert len(ax.collections) == 1  # One seed: a plain line, no band.
  assert fig.legends[0].get_title().get_text() == "(n=K): mean ± 1 s.d. of K seeds"


def test_mean_band_interpolates_seeds_that_log_at_other_points():
  xs, mean, std = report_runs.mean_band([(np.array([0.0, 10, 20, 30]), np.array([4.0, 3, 2, 1])),
                                       (np.array([0.0, 15, 25]), np.array([6.0, 3, 1]))])
  np.testing.assert_allclose(xs, [0, 10, 20])  # x = 30 lies beyond the second seed's range.
  np.testing.assert_allclose(mean, [5.0, 3.5, 2.0])  # The second seed: 6, 4, 2 there.
  np.testing.assert_allclose(std, [2 ** 0.5, 0.5 ** 0.5, 0.0])


def test_loss_axes_have_units_si_ticks_and_a_y_range_from_the_end(tmp_path):
  steps = list(range(0, 101, 10))
  fast = [2.0 + 4.0 * np.exp(-s / 5) for s in steps]  # Falls steeply from 6, then flat.
  slow = [y + 0.02 for y in fast]
  figs = report_plots.figures({"fast": [_eval_run(tmp_path / "f", fast, steps)],
                            "slow": [_eval_run(tmp_path / "s", slow, steps)]})
  ax = figs["eval_loss"].axes[0]
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "eval loss (nats/token)")
  assert figs["eval_bits_per_byte"].axes[0].get_ylabel() == "eval loss (bits/byte)"
  low, high = ax.get_ylim()
  # The last 75% of x (steps 30-100): 2.0 to 2.03, plus 10%; the start at 6 is cut off.
  assert low < min(fast) and high > slow[3] and high - low < 0.04
  assert ax.xaxis.get_major_formatter()(1_500_000) == "1.5M"
  assert ax.xaxis.get_major_formatter()(2e9) == "2G"


def test_a_branch_is_drawn_from_its_branch_point(tmp_path):
  stable = _eval_run(tmp_path / "stable", [3.0, 2.9, 2.8, 2.7, 2.6], [0, 100, 200, 300, 400])
  branch = _eval_run(tmp_path / "branch", [2.82, 2.75, 2.7])
  (tmp_path / "branch" / "config.gin").write_text(  # As jaxlm.train writes it.
      f"STABLE_RUN = '{stable}'\nSTABLE_STEP = 180\n# Parameters for RestoreConfig:\n"
      "RestoreConfig.path = %STABLE_RUN\nRestoreConfig.step = %STABLE_STEP\n"
      "Stage.restore_from = @RestoreConfig()\n")
  assert report_runs.restore_point(branch) == (stable, 180)
  assert report_runs.branch_offset(branch, "step") == 180
  assert report_runs.branch_offset(branch, "tokens") == 18000  # The source's tokens at step 180.
  xs, ys = report_runs.run_curves(branch, "tokens")["eval/loss"]
  np.testing.assert_allclose(xs, [18000, 19000, 20000])
  assert ys[0] == pytest.approx(np.interp(18000, *report_runs.run_curves(stable, "tokens")[
      "eval/loss"]), abs=0.01)  # Its first point lies on the source's curve.
  twig = _restored_from(_write_run(tmp_path / "twig", [{"step": 0, "total/tokens": 0.0}]),
                        branch, 10)  # A branch of the branch: both offsets.
  assert report_runs.branch_offset(str(twig), "tokens") == 19000
  _restored_from(tmp_path / "branch", tmp_path / "gone", 180)  # The restore's record wins ...
  assert report_runs.branch_offset(branch, "tokens") == 0  # ... a source not on disk: from 0.


def _staged_run(path, starts, last=80, resume_at=None):
  """Records as the trainer writes them: each step's train record and (every 10 steps) its
  evaluation with forgetting/all; at each stage start data/proportion/* and then the stage's
  baseline evaluation; a resume writes data/proportion/* only."""
  records = []
  for step in range(last + 1):
    total = {"total/tokens": 100.0 * step, "total/flops": 1e9 * step}
    if step:
      records.append({"step": step, "train/loss": 2.0, **total})
    if step and step % 10 == 0:
      records.append({"step": step, "eval/loss": 3.0, "forgetting/all": step / 100, **total})
    if step in starts or step == resume_at:
      records.append({"step": step, "data/proportion/wiki": 1.0, **total})
    if step in starts:
      records.append({"step": step, "eval/loss": 3.0, **total})
  return str(_write_run(path, records))


def test_forgetting_only_in_a_stage_that_follows_another(tmp_path):
  two = _staged_run(tmp_path / "two", starts=(0, 40), resume_at=60)
  assert report_runs.stage_starts(two) == [0, 40]  # The resume at 60 starts no stage.
  np.testing.assert_allclose(report_runs.run_curves(two, "step")["forgetting/all"][0],
                             [50, 60, 70, 80])
  one = _staged_run(tmp_path / "one", starts=(0,), resume_at=30)
  assert "forgetting/all" not in report_runs.run_curves(one, "step")
  assert "forgetting" not in report_plots.figures({"one": [one]})
  assert "forgetting" in report_plots.figures({"one": [one], "two": [two]})
  _restored_from(tmp_path / "one", tmp_path / "gone", 800)  # A continual run: all of it.
  assert len(report_runs.run_curves(one, "step")["forgetting/all"][0]) == 8


def test_nats_per_token_figures_are_left_out_where_tokenizers_differ(tmp_path):
  byte = _eval_run(tmp_path / "bytes", [5.0, 3.0, 2.0])
  bpe = _eval_run(tmp_path / "bpe", [6.0, 3.6, 2.6], bytes_per_token=1.4)
  assert sorted(report_plots.figures({"bytes": [byte], "bpe": [bpe]})) == ["eval_bits_per_byte"]
  same = _eval_run(tmp_path / "same", [5.0, 3.1, 2.1])
  assert sorted(report_plots.figures({"bytes": [byte], "same": [same]})) == [
      "eval_bits_per_byte", "eval_loss"]


def test_named_runs():
  assert report_runs.named_runs(["a=x", "b=y,z"]) == {"a": ["x"], "b": ["y", "z"]}
  assert report_runs.named_runs(["runs/base/", "c=w"], plain=True) == {"base": ["runs/base/"],
                                                                      "c": ["w"]}
  for bad in ("a=", "a=x,", "=x", "x"):
    with pytest.raises(report_runs.ReportError, match=r"expected NAME=DIR\[,DIR\.\.\.\]"):
      report_runs.named_runs([bad])
  with pytest.raises(report_runs.ReportError, match="given twice"):
    report_runs.named_runs(["a=x", "a=y"])


def _error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("plot_runs: error: "), err
  return err[0]


def test_errors(runs, tmp_path, capsys):
  a, _ = runs
  out = f"--out={tmp_path / 'out'}"
  assert plot_runs_cli.main([str(a), str(tmp_path), out]) == 2
  assert "no metrics.jsonl" in _error_line(capsys)
  assert plot_runs_cli.main([str(a), "--x=time", out]) == 2
  assert "unknown --x='time'" in _error_line(capsys)
  no_tokens = _write_run(tmp_path / "old", [{"step": 1, "train/loss": 3.0}])
  assert plot_runs_cli.main([str(a), str(no_tokens), "--x=tokens", out]) == 2
  assert "lacks total/tokens" in _error_line(capsys)
  assert plot_runs_cli.main(["base=", out]) == 2
  assert "'base=': expected NAME=DIR[,DIR...]" in _error_line(capsys)
  assert plot_runs_cli.main([f"base={a},{tmp_path / 'empty'}", out]) == 2  # A seed without metrics.
  assert f"{tmp_path / 'empty'}: no metrics.jsonl" in _error_line(capsys)
  assert plot_runs_cli.main([str(a), f"run_a={a}", out]) == 2
  assert "given twice" in _error_line(capsys)
  assert plot_runs_cli.main([str(a), "--target=eval/loss", out]) == 2
  assert "expected METRIC:VALUE" in _error_line(capsys)
  assert not (tmp_path / "out").exists()  # Nothing is written on bad input.


def test_exit_status_from_the_command_line(tmp_path):
  result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plot_runs.py"),
                           str(tmp_path), "--x=flops"], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"plot_runs: error: {tmp_path}: no metrics.jsonl (is it a MODEL_DIR?)")
