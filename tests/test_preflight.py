"""Pre-flight (issue 11): a second command that is wrong in any way, run over a MODEL_DIR that
holds a finished run, exits 2 with one line and leaves every file in MODEL_DIR byte-identical."""

import dataclasses
import os
import shutil
import subprocess
import sys

import optax
import pytest

from conftest import REPO_ROOT, quick_run_args
from jaxlm import train
from jaxlm.config import gin_config
from jaxlm.training import preflight
from jaxlm.checkpointing.checkpoint import CORRUPT_DIR
from jaxlm.errors import UserError
from jaxlm.training.stages import configured_stages
from helpers import tiny_stage


def snapshot(directory) -> dict:
  """Every file's bytes and every folder under `directory`, by relative path."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), directory) + "/"] = None
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A completed 6-step run (checkpoints at 3 and 6, metrics, config.gin) and its corpus."""
  root = tmp_path_factory.mktemp("finished")
  corpus = root / "corpus.txt"
  import textwrap  # pylint: disable=import-outside-toplevel
  corpus.write_text(open(textwrap.__file__, encoding="utf-8").read(), encoding="utf-8")
  assert train.main(quick_run_args(root / "run", corpus, "--gin.TrainerConfig.sample_tokens=0",
                                   "--gin.TrainerConfig.tensorboard=False")) == 0
  return root / "run", corpus


@pytest.fixture
def model_dir(finished_run, tmp_path):
  """A private copy of the finished run, so each test may try to damage it."""
  copy = tmp_path / "run"
  shutil.copytree(finished_run[0], copy)
  return copy


def _args(model_dir, corpus, *extra):
  return quick_run_args(model_dir, corpus, "--gin.TrainerConfig.sample_tokens=0",
                        "--gin.TrainerConfig.tensorboard=False", *extra)


def _error_lines(stderr: str) -> list[str]:
  assert "Traceback" not in stderr, stderr[-3000:]
  return [line for line in stderr.splitlines() if line.startswith("jaxlm: error:")]


@pytest.mark.parametrize("extra, expected", [
    # The checkpoints do not fit this config: a configuration error, not corruption.
    (["--gin.ModelConfig.d_model=64"],
     "'params/embed/embedding' is (384, 128) there but (384, 64) here"),
    (["--gin.ModelConfig.num_layers=3"], "'params/layer_3/attention/key' (128, 2, 32) is there but not here"),
    (["--gin.ModelConfig.num_layers=5"], "'params/layer_4/attention/key' (128, 2, 32) is missing there but needed here"),
    (["--gin.ModelConfig.vocab_size=100"], "the tokenizer has 259 ids but ModelConfig.vocab_size=100"),
    (["--gin.ModelConfig.vocab_size=512"], "is (384, 128) there but (512, 128) here"),
    (["--gin.Stage.num_steps=2"], "does not fit this run's stages ('pretrain' 0..2)"),
    # Keep policies that would delete everything, zero cadences, unknown modes.
    (["--gin.TrainerConfig.keep_checkpoints=-1"], "TrainerConfig.keep_checkpoints must be an integer in [1, inf) or None"),
    (["--gin.TrainerConfig.keep_checkpoints=0"], "TrainerConfig.keep_checkpoints must be"),
    (["--gin.TrainerConfig.keep_checkpoint_every=0"], "TrainerConfig.keep_checkpoint_every must be"),
    (["--gin.TrainerConfig.checkpoint_every=0"], "TrainerConfig.checkpoint_every must be"),
    (["--gin.TrainerConfig.log_every=0"], "TrainerConfig.log_every must be an integer in [1, inf)"),
    (["--gin.EvalConfig.every=0"], "EvalConfig.every must be"),
    (["--gin.TrainerConfig.progress='fancy'"], "TrainerConfig.progress must be one of ['auto', 'bar', 'log']"),
    # A string where a number belongs; non-finite and out-of-range hyper-parameters.
    (["--gin.DataConfig.batch_size='4'"], "DataConfig.batch_size must be an integer, got '4' (str)"),
    (["--gin.warmup_cosine.peak_lr=1e999"], "warmup_cosine.peak_lr must be a number in (0, inf), got inf"),
    (["--gin.warmup_cosine.peak_lr=-1e-3"], "warmup_cosine.peak_lr must be"),
    (["--gin.adamw.weight_decay=-0.1"], "adamw.weight_decay must be a number in [0, inf)"),
    (["--gin.adamw.b1=1.0"], "adamw.b1 must be a number in [0, 1)"),
    (["--gin.adamw.b2=-0.5"], "adamw.b2 must be a number in [0, 1)"),
    (["--gin.ModelConfig.norm_eps=0.0"], "ModelConfig.norm_eps must be"),
    (["--gin.ModelConfig.attention_impl='fastest'"], "attention_impl='fastest' is not available"),
    (["--gin.MeshConfig.rules='megatron'"], "unknown rule set 'megatron'"),
    # Bad data and restore sources are found before anything is written.
    (["--gin.Stage.num_steps=9", "--gin.text_files.paths='{empty}'"], "has no text"),
    (["--gin.Stage.restore_from=@RestoreConfig()", "--gin.RestoreConfig.path='/nonexistent'"],
     "cannot restore from '/nonexistent'"),
    (["--gin.Stage.restore_from=@RestoreConfig()"], "never sets RestoreConfig.path"),
])
def test_bad_second_command_is_one_line_and_touches_nothing(model_dir, finished_run, tmp_path,
                                                            capsys, extra, expected):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  before = snapshot(model_dir)
  code = train.main(_args(model_dir, finished_run[1], *[e.format(empty=empty) for e in extra]))
  errors = _error_lines(capsys.readouterr().err)
  assert code == 2
  assert len(errors) == 1 and expected in errors[0], errors
  assert snapshot(model_dir) == before


@pytest.mark.parametrize("extra, expected", [
    (["--gin.ModelConfig.d_model=64"], "there but (384, 64) here; use a new MODEL_DIR"),
    (["--gin.TrainerConfig.keep_checkpoints=-1"], "keep_checkpoints must be"),
])
def test_in_a_subprocess_stderr_is_exactly_one_line(model_dir, finished_run, extra, expected):
  before = snapshot(model_dir)
  result = subprocess.run([sys.executable, "-m", "jaxlm.train",
                           *_args(model_dir, finished_run[1], *extra)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxlm: error: ") and expected in lines[0], lines
  assert snapshot(model_dir) == before


@pytest.mark.parametrize("text, expected", [
    ("", "never sets run.model_dir, run.stages, which are required"),
    ("include 'gin/runs/pretrain.gin'\nMODEL_DIR = '{model_dir}'\n"
     "DataConfig.source = @text_files()\n", "never sets text_files.paths, which is required"),
])
def test_gin_files_without_required_bindings(model_dir, tmp_path, capsys, text, expected):
  gin_file = tmp_path / "partial.gin"
  gin_file.write_text(text.format(model_dir=model_dir))
  before = snapshot(model_dir)
  assert train.main([f"--gin_file={gin_file}"]) == 2
  errors = _error_lines(capsys.readouterr().err)
  assert len(errors) == 1 and expected in errors[0], errors
  assert snapshot(model_dir) == before


def test_a_resumed_run_with_another_config_keeps_the_previous_config(model_dir, finished_run):
  previous = (model_dir / "config.gin").read_text()
  assert train.main(_args(model_dir, finished_run[1], "--gin.Stage.num_steps=8")) == 0
  kept = [f for f in os.listdir(model_dir) if f.startswith("config.") and f != "config.gin"]
  assert len(kept) == 1 and kept[0].endswith(".gin")
  assert (model_dir / kept[0]).read_text() == previous
  assert "Stage.num_steps = 8" in (model_dir / "config.gin").read_text()
  # The same config again replaces nothing.
  assert train.main(_args(model_dir, finished_run[1], "--gin.Stage.num_steps=8")) == 0
  assert sorted(f for f in os.listdir(model_dir) if f.startswith("config.")) == sorted(
      ["config.gin", kept[0]])


def test_an_unreadable_checkpoint_is_set_aside_and_reported_once(model_dir, finished_run):
  state = model_dir / "checkpoints" / "6" / "state"
  for data in state.rglob("d"):  # The array data of the newest checkpoint is gone.
    shutil.rmtree(data, ignore_errors=True)
  result = subprocess.run([sys.executable, "-m", "jaxlm.train",
                           *_args(model_dir, finished_run[1], "--gin.Stage.num_steps=8")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  reports = [l for l in result.stderr.splitlines() if "checkpoint 6" in l]
  assert len(reports) == 1 and "is unreadable" in reports[0], reports
  assert "falling back to checkpoint 3" in reports[0]
  assert len(os.listdir(model_dir / CORRUPT_DIR)) == 1
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["3", "6", "8"]


def test_an_overflowing_update_is_named_as_such(tmp_path, finished_run, capsys):
  """Loss and gradients stay finite; a learning rate near float32's maximum makes the update's
  norm overflow. The stop says so, and that no checkpoint exists yet."""
  code = train.main(_args(tmp_path / "run", finished_run[1], "--gin.warmup_cosine.peak_lr=3e38",
                          "--gin.warmup_cosine.warmup_steps=0",
                          "--gin.TrainerConfig.max_consecutive_nonfinite=2"))
  errors = _error_lines(capsys.readouterr().err)
  assert code == train.EXIT_DIVERGED
  assert len(errors) == 1, errors
  assert "the optimizer update overflowed (loss and gradients were finite)" in errors[0]
  assert "no checkpoint was saved before it" in errors[0]
  assert "non-finite loss or gradients" not in errors[0]


def test_restore_from_another_run_is_checked_before_the_new_run_starts(finished_run, tmp_path,
                                                                       capsys):
  source, corpus = finished_run
  restore = ["--gin.Stage.restore_from=@RestoreConfig()", f"--gin.RestoreConfig.path='{source}'"]
  # A map that cannot fit is refused from the source's metadata alone: nothing is created.
  assert train.main(_args(tmp_path / "bad", corpus, *restore, "--gin.ModelConfig.d_model=64")) == 2
  errors = _error_lines(capsys.readouterr().err)
  assert len(errors) == 1 and "cannot load 'params/embed/embedding' (384, 128) into" in errors[0]
  assert not (tmp_path / "bad").exists()
  # One that fits trains, and reports what it loaded.
  assert train.main(_args(tmp_path / "good", corpus, *restore)) == 0
  assert (tmp_path / "good" / "restore_report.json").exists()


TWO_STAGES = ["--gin.run.stages=[@warm/Stage(), @anneal/Stage()]", "--gin.warm/Stage.num_steps=3",
              "--gin.anneal/Stage.num_steps=3"]


@pytest.mark.parametrize("extra, expected", [
    (["--gin.anneal/DataConfig.mixture={'wiki': 1.0}"],
     "DataConfig.mixture names 'wiki', which is not a source"),
    (["--gin.anneal/ModelConfig.d_model=64"],
     "stage 'anneal' changes the model, which the 'identity' transition cannot do"),
    (["--gin.anneal/DataConfig.source=@anneal/text_files()",
      "--gin.anneal/text_files.paths='/nonexistent/anneal.txt'"], "/nonexistent/anneal.txt"),
    (["--gin.run.stages=[@Stage(), @Stage()]"], "several stages are named 'pretrain'"),
])
def test_a_later_stage_that_is_wrong_fails_before_the_first_trains(tmp_path, finished_run,
                                                                   capsys, extra, expected):
  code = train.main(_args(tmp_path / "run", finished_run[1], *TWO_STAGES, *extra))
  errors = _error_lines(capsys.readouterr().err)
  assert code == 2
  assert len(errors) == 1 and expected in errors[0], errors
  assert not (tmp_path / "run").exists()  # Nothing trained, nothing written.


def test_stages_are_named_after_their_gin_scope(tmp_path, finished_run):
  """(The checkpoint record carries Stage.name: tests/test_trainer.py.)"""
  args = train.parse_args(_args(tmp_path / "run", finished_run[1], *TWO_STAGES))
  gin_config.parse(args.gin_file, args.gin_bindings)
  assert [stage.name for stage in configured_stages()] == ["warm", "anneal"]


def test_kept_optimizer_state_must_fit_the_next_stage(small_text_file):
  first = tiny_stage(small_text_file, 4, name="adam")
  second = tiny_stage(small_text_file, 4, name="sgd", keep_optimizer_state=True,
                  optimizer=lambda schedule: optax.sgd(schedule, momentum=0.9))
  with pytest.raises(UserError, match="keep_optimizer_state needs the optimizer state the "
                                      "transition gives to fit the stage, but 'opt_state/"):
    preflight.check_transitions([first, second])
  preflight.check_transitions([first, dataclasses.replace(second, optimizer=first.optimizer)])
