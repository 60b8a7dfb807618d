"""tools/plot_runs.py: the metrics reader (duplicate steps, x axes), the PNGs it writes for two
synthetic runs, and its bad-input errors (one line on stderr, exit 2)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_tool

pytest.importorskip("matplotlib")


plot_runs = load_tool("plot_runs")
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


@pytest.fixture
def runs(tmp_path):
  a = _write_run(tmp_path / "run_a", _records(resumed=True))
  b = _write_run(tmp_path / "run_b", _records(scale=1.1, forgetting=False))
  return a, b


def test_reader_series_duplicates_and_x_axes(runs):
  a, _ = runs
  series = plot_runs.read_metrics(str(a))
  xs, ys = series["train/loss"]
  assert xs == [1, 2, 3, 4, 5, 6]
  assert ys[3] == 99.0  # The resumed run's later record of step 4 wins.
  assert ys[:3] == [4.5, 4.0, 3.5]
  assert series["eval/code/loss"] == ([2, 4, 6], pytest.approx([3.8, 3.6, 3.4]))
  assert "step" not in series
  by_tokens = plot_runs.read_metrics(str(a), x="tokens")
  assert by_tokens["train/loss"][0] == [100, 200, 300, 400, 500, 600]
  assert by_tokens["forgetting/prose"][0] == [200, 400, 600]
  assert plot_runs.read_metrics(str(a), x="flops")["perf/tokens_per_sec"][0][-1] == 6e9


def test_reader_skips_a_cut_off_last_line(tmp_path):
  run = _write_run(tmp_path / "r", _records())
  with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7, "train/lo')
  assert plot_runs.read_metrics(str(run))["train/loss"][0][-1] == 6


def _assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def test_cli_writes_every_plot(runs, tmp_path, capsys):
  out = tmp_path / "plots"
  assert plot_runs.main([*map(str, runs), "--x=tokens", f"--out={out}", "--names=base,wide"]) == 0
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
  paths = plot_runs.plot_runs([str(a), str(b)], str(tmp_path / "out"), x="flops")
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
      "learning_rate.png", "throughput.png", "train_loss.png"]


def _error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("plot_runs: error: "), err
  return err[0]


def test_errors(runs, tmp_path, capsys):
  a, _ = runs
  out = f"--out={tmp_path / 'out'}"
  assert plot_runs.main([str(a), str(tmp_path), out]) == 2
  assert "no metrics.jsonl" in _error_line(capsys)
  assert plot_runs.main([str(a), "--x=time", out]) == 2
  assert "unknown --x='time'" in _error_line(capsys)
  no_tokens = _write_run(tmp_path / "old", [{"step": 1, "train/loss": 3.0}])
  assert plot_runs.main([str(a), str(no_tokens), "--x=tokens", out]) == 2
  assert "lacks total/tokens" in _error_line(capsys)
  assert plot_runs.main([str(a), "--names=x,y", out]) == 2
  assert "2 names for 1 runs" in _error_line(capsys)
  assert not (tmp_path / "out").exists()  # Nothing is written on bad input.


def test_exit_status_from_the_command_line(tmp_path):
  result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plot_runs.py"),
                           str(tmp_path), "--x=flops"], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"plot_runs: error: {tmp_path}: no metrics.jsonl (is it a MODEL_DIR?)")
