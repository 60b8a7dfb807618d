"""No gin binding is silently ignored (jaxlm/config/gin_usage.py): a scoped stage builds its schedule,
optimizer and transitions in its own scope, and a binding nothing reads stops the run before
anything is written, naming where it was set."""

import os

import pytest

from conftest import REPO_ROOT, quick_run_args
from jaxlm import train
from jaxlm.config import gin_config
from jaxlm.training.stages import configured_stages


def _learning_rates(stage, steps):
  schedule = stage.make_schedule()
  return [float(schedule(s)) for s in steps]


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)


def test_growlength_stage_long_gets_its_own_warmup(in_repo):
  """`long/warmup_cosine.warmup_steps = 0` reaches stage "long" without binding its schedule:
  no 30-step re-warm at the last length change (before: 0, 5e-4, 1e-3 at steps 0, 5, 10)."""
  gin_config.parse(["experiments/growth/growlength.gin"], ["MODEL_DIR = '/tmp/unused'"])
  short, medium, long = configured_stages()
  assert _learning_rates(long, [0])[0] == pytest.approx(3e-3)
  assert _learning_rates(long, [0, 100, 299]) == sorted(_learning_rates(long, [0, 100, 299]),
                                                         reverse=True)
  assert _learning_rates(short, [0, 15, 30]) == pytest.approx([0.0, 1.5e-3, 3e-3])
  assert _learning_rates(medium, [0, 100]) == pytest.approx([3e-3, 3e-3])


def test_spdf_dense_stage_warms_up_over_its_own_10_steps(in_repo):
  gin_config.parse(["experiments/sparse/spdf.gin"], ["MODEL_DIR = '/tmp/unused'"])
  sparse, dense = configured_stages()
  assert _learning_rates(dense, [0, 5, 10]) == pytest.approx([0.0, 1.5e-3, 3e-3])
  assert _learning_rates(sparse, [15, 30]) == pytest.approx([1.5e-3, 3e-3])  # base.gin's 30.


def _error(capsys, argv) -> str:
  code = train.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert err[-1].startswith("jaxlm: error: ") and "Traceback" not in "\n".join(err)
  return err[-1]


def test_a_command_line_binding_in_a_scope_nothing_uses_stops_the_run(tmp_path, small_text_file,
                                                                    capsys):
  model_dir = tmp_path / "run"
  line = _error(capsys, quick_run_args(model_dir, small_text_file,
                                       "--gin.nosuch/warmup_cosine.warmup_steps=0"))
  assert ("gin binding nosuch/warmup_cosine.warmup_steps (command-line binding "
          "'nosuch/warmup_cosine.warmup_steps = 0') is never used: nothing in this run is built "
          "in scope 'nosuch'") in line
  assert not model_dir.exists()  # Refused before anything was written.


def test_a_file_binding_for_a_schedule_the_stage_does_not_use_names_file_and_line(
    tmp_path, small_text_file, capsys):
  experiment = tmp_path / "two_stages.gin"
  experiment.write_text(
      "include 'experiments/quickstart.gin'\n"
      "run.stages = [@warm/Stage(), @anneal/Stage()]\n"
      "anneal/Stage.schedule = @anneal/warmup_constant\n"
      "anneal/warmup_cosine.warmup_steps = 0\n")
  model_dir = tmp_path / "run"
  argv = [f"--gin_file={experiment}", *quick_run_args(model_dir, small_text_file)[1:]]
  line = _error(capsys, argv)
  assert (f"gin binding anneal/warmup_cosine.warmup_steps ({experiment}, line 4) is never used: "
          "warmup_cosine is called only in scopes 'warm'; if stage 'anneal' should use it, bind "
          "anneal/Stage.schedule = @anneal/warmup_cosine") in line
  assert not model_dir.exists()


def test_an_unused_macro_and_a_shadowed_default_are_refused(tmp_path, small_text_file, capsys):
  line = _error(capsys, quick_run_args(tmp_path / "a", small_text_file, "--gin.STEPS=5"))
  assert "gin macro STEPS (command-line binding 'STEPS = 5') is never used" in line
  experiment = tmp_path / "shadowed.gin"
  experiment.write_text("include 'experiments/quickstart.gin'\n"
                        "run.stages = [@only/Stage()]\n"
                        "only/Stage.num_steps = 6\n")
  argv = [f"--gin_file={experiment}", *quick_run_args(tmp_path / "b", small_text_file)[1:]]
  argv.remove("--gin_defaults=Stage.num_steps = 6")
  line = _error(capsys, argv)
  assert ("gin binding Stage.num_steps (experiments/quickstart.gin, line 8) is never used: every "
          "call of Stage in scope 'unscoped' gets num_steps from the code or from a binding in a "
          "narrower scope") in line


def test_shared_defaults_may_go_unused_with_a_warning(tmp_path, small_text_file, caplog):
  """--gin_defaults (a family's shared bindings) and the building blocks under gin/ are listed,
  not refused; --dry_run checks everything and writes nothing."""
  model_dir = tmp_path / "run"
  code = train.main(quick_run_args(model_dir, small_text_file,
                                   "--gin_defaults=warmup_constant.peak_lr = 1e-3", "--dry_run"))
  err = caplog.text
  assert code == 0, err
  assert ("gin binding warmup_constant.peak_lr (--gin_defaults binding 'warmup_constant.peak_lr "
          "= 1e-3') is never used: nothing in this run calls warmup_constant") in err
  assert "a shared default, so not an error" in err
  assert "dry run: every check passed" in err
  assert not model_dir.exists()


def test_restart_sources_must_name_a_source_of_the_stage(tmp_path, small_text_file, capsys):
  line = _error(capsys, quick_run_args(tmp_path / "run", small_text_file,
                                       "--gin.Stage.restart_sources=['wiki']"))
  assert "Stage.restart_sources names ['wiki'], which the stage does not read" in line


def test_a_transition_on_the_first_stage_is_refused(tmp_path, small_text_file, capsys):
  line = _error(capsys, quick_run_args(tmp_path / "run", small_text_file,
                                       "--gin.Stage.transition=[@densify]"))
  assert "is the first stage, so its transition ['densify'] has nothing to map" in line
  assert not os.path.exists(tmp_path / "run")
