"""Shared fixtures: gin state is global, so every test starts from an empty config."""

import pathlib
import textwrap

import gin
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def small_text_file(tmp_path):
  """A ~20 KB real text (a standard-library module's source): no download, no shared corpora."""
  path = tmp_path / "corpus.txt"
  path.write_text(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  return path


def quick_run_args(model_dir, text_file, *extra):
  """CLI arguments for a few-step run of the quickstart experiment on a small text file."""
  return [
      "--gin_file=experiments/quickstart.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.Stage.num_steps=6",
      "--gin.DataConfig.source=@text_files",
      f"--gin.text_files.paths='{text_file}'",
      "--gin.DataConfig.seq_len=64",
      "--gin.DataConfig.batch_size=4",
      "--gin.DataConfig.max_eval_batches=2",
      "--gin.warmup_cosine.warmup_steps=2",
      "--gin.TrainerConfig.log_every=2",
      "--gin.EvalConfig.every=3",
      "--gin.TrainerConfig.checkpoint_every=3",
      "--gin.TrainerConfig.sample_tokens=16",
      "--gin.TrainerConfig.peak_flops_per_device=1e12",
      *extra,
  ]
