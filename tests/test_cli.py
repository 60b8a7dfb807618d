"""`python -m jaxlm.train`: an end-to-end run, gin parsing, and one clear line for bad input."""

import json
import os
import subprocess
import sys

import gin
import pytest

from conftest import REPO_ROOT, quick_run_args
from jaxlm import train
from jaxlm.config import gin_config
from jaxlm.data.pipeline import DataConfig
from jaxlm.model import ModelConfig
from jaxlm.training.stages import Stage


def _read_metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_end_to_end_cli_run_in_a_subprocess(tmp_path, small_text_file):
  model_dir = tmp_path / "run"
  # Run from an unrelated directory: gin files and includes resolve through the search paths.
  result = subprocess.run([sys.executable, "-m", "jaxlm.train",
                           *quick_run_args(model_dir, small_text_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = _read_metrics(model_dir)
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [2, 4, 6]
  assert all(r["perf/tokens_per_sec"] > 0 and 0 < r["perf/mfu"] for r in records
             if "perf/mfu" in r)
  # The baseline before the first update, then every 3 steps.
  assert [r["step"] for r in records if "eval/loss" in r] == [0, 3, 6]
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["3", "6"]
  assert os.listdir(model_dir / "tensorboard")
  assert "Stage.num_steps = 6" in (model_dir / "config.gin").read_text()
  assert "sample:" in result.stderr


def test_gin_files_and_bindings_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  gin_config.parse(["experiments/quickstart.gin"],
                   ["MODEL_DIR = '/tmp/x'", "ModelConfig.num_layers = 3"])
  model = ModelConfig()
  assert (model.d_model, model.num_layers, model.num_kv_heads) == (128, 3, 2)
  assert Stage().num_steps == 600
  assert DataConfig().seq_len == 256
  assert gin.query_parameter("warmup_cosine.peak_lr") == 3e-3


@pytest.mark.parametrize("extra, expected", [
    (["--gin.Stage.num_stpes=3"], "has no parameter 'num_stpes'; did you mean 'num_steps'?"),
    (["--gin.ModelConfg.d_model=64"], "unknown gin configurable 'ModelConfg'; did you mean 'ModelConfig'?"),
    (["--gin.Stage.num_steps=("], "bad gin config"),
    (["--gin.DataConfig.seq_len=2048"], "outside what the model takes"),
    (["--gin.text_files.paths='/nonexistent/corpus.txt'"], "/nonexistent/corpus.txt"),
    (["--gin.ModelConfig.num_kv_heads=3"], "not a multiple of num_kv_heads"),
    (["--gin.Stage.transition='grow_width'"], "names 'grow_width'; give the transition itself"),
    (["--gin.Stage.transition=[@grow_sideways]"], "grow_sideways"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, small_text_file, capsys, extra,
                                                expected):
  code = train.main(quick_run_args(tmp_path / "run", small_text_file, *extra))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert err[-1].startswith("jaxlm: error: ") and expected in err[-1], err
  assert "Traceback" not in "\n".join(err)


def test_missing_gin_file(capsys):
  assert train.main(["--gin_file=experiments/nope.gin"]) == 2
  assert "gin file 'experiments/nope.gin' not found" in capsys.readouterr().err


def test_missing_model_dir_macro(capsys):
  assert train.main(["--gin_file=experiments/quickstart.gin"]) == 2
  assert "MODEL_DIR is used but never set" in capsys.readouterr().err


def test_model_dir_not_writable(tmp_path, small_text_file, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  assert train.main(quick_run_args(blocker / "run", small_text_file)) == 2
  assert "is not writable" in capsys.readouterr().err
  assert blocker.read_text() == "not a directory"  # Nothing already there was touched.


def test_empty_corpus(tmp_path, small_text_file, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  code = train.main(quick_run_args(tmp_path / "run", small_text_file,
                                   f"--gin.text_files.paths='{empty}'"))
  assert code == 2
  assert "no text" in capsys.readouterr().err


def test_bad_input_in_a_subprocess_prints_no_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "jaxlm.train", "--gin_file=nope.gin"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith("jaxlm: error: gin file 'nope.gin' not found")


def test_the_final_line_keeps_small_figures():
  line = train.final_summary({"train/loss": 1.23456789, "train/learning_rate": 3e-5, "step": 600})
  assert line == "train/loss=1.235, train/learning_rate=3e-05, step=600"
