"""Fault injection: kill -9, SIGTERM, corrupt checkpoints, NaN gradients, restore with an
assignment map, pre-flight checks, keep policy. Nothing already saved may be lost."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import quick_run_args
from jaxlm import parallel
from jaxlm.training import preflight
from jaxlm.training import run_plan
from jaxlm.training import trainer
from jaxlm.checkpointing.checkpoint import CORRUPT_DIR, Checkpointer
from jaxlm.data.pipeline import build_datasets
from jaxlm.errors import TrainingDiverged, UserError
from jaxlm.model import token_losses
from jaxlm.model import ModelConfig
from jaxlm.optim.schedules import warmup_cosine
from jaxlm.training.preemption import EXIT_FORCED, EXIT_PREEMPTED
from jaxlm.checkpointing.restore import RestoreConfig, restore_into
from jaxlm.training.train_step import make_train_step, sharded_init, state_shardings
from jaxlm.tree_names import flatten_names
from helpers import (QUIET, TINY, kill_once_logged, last_logged_step, metric_records, raw_state,
                     resume, start_and_wait_for, tiny_stage)

STEPS = 60


def _cli_args(model_dir, corpus):
  return [sys.executable, "-m", "jaxlm.train", *quick_run_args(
      model_dir, corpus, f"--gin.Stage.num_steps={STEPS}", "--gin.TrainerConfig.log_every=1",
      "--gin.TrainerConfig.checkpoint_every=5", "--gin.EvalConfig.every=1000",
      "--gin.TrainerConfig.sample_tokens=0", "--gin.TrainerConfig.progress='log'")]


def _losses(model_dir):
  return {r["step"]: r["train/loss"] for r in metric_records(model_dir) if "train/loss" in r}


def _raw_params(model_dir, step):
  return raw_state(model_dir, step)["params"]


def _mean_loss(params, stage, batch):
  ce_BL = token_losses(params, stage.model, batch)
  return jnp.sum(ce_BL * batch["weights"]) / jnp.sum(batch["weights"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted CLI run that every interrupted run must reproduce bit for bit."""
  root = tmp_path_factory.mktemp("reference")
  corpus = root / "corpus.txt"
  import textwrap
  corpus.write_text(open(textwrap.__file__, encoding="utf-8").read())
  result = subprocess.run(_cli_args(root / "run", corpus), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return root / "run", corpus


# More kill points under -m slow (the default suite must stay under 15 minutes on 2 cores).
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, reference_run, seed):
  reference, corpus = reference_run
  kill_at = int(np.random.default_rng(seed).integers(3, STEPS // 2))
  model_dir = tmp_path / "run"
  process = kill_once_logged(_cli_args(model_dir, corpus), model_dir, kill_at)
  assert process.returncode == -signal.SIGKILL
  killed_at = last_logged_step(model_dir)
  assert killed_at < STEPS  # It really died mid-run.

  resume(_cli_args(model_dir, corpus))
  jax.tree.map(np.testing.assert_array_equal, _raw_params(reference, STEPS),
               _raw_params(model_dir, STEPS))
  # The log past the resume point is rewritten as if the run had never stopped.
  assert _losses(model_dir) == _losses(reference)


@pytest.mark.slow  # Default suite under 15 minutes; .ci/run runs the slow tests.
def test_sigterm_checkpoints_the_step_reached_and_exits_75(tmp_path, reference_run):
  _, corpus = reference_run
  model_dir = tmp_path / "run"
  process = start_and_wait_for(_cli_args(model_dir, corpus), model_dir, 7)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == EXIT_PREEMPTED, err[-2000:]
  reached = last_logged_step(model_dir)
  assert Checkpointer(str(model_dir)).latest_step() == reached < STEPS
  assert f"checkpoint saved at step {reached}" in err

  result = subprocess.run(_cli_args(model_dir, corpus), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from step {reached}" in result.stderr
  assert max(_losses(model_dir)) == STEPS


@pytest.mark.slow  # Half a minute of subprocess; .ci/run runs the slow tests.
def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, reference_run):
  reference, corpus = reference_run
  model_dir = tmp_path / "run"
  process = start_and_wait_for(_cli_args(model_dir, corpus), model_dir, 12)
  process.send_signal(signal.SIGTERM)
  process.send_signal(signal.SIGTERM)
  process.communicate(timeout=120)
  assert process.returncode in (EXIT_FORCED, EXIT_PREEMPTED)  # 75 only if it won the race.
  result = subprocess.run(_cli_args(model_dir, corpus), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  jax.tree.map(np.testing.assert_array_equal, _raw_params(reference, STEPS),
               _raw_params(model_dir, STEPS))


def _biggest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def trained_to_step_8(tmp_path_factory):
  """A finished 8-step run (checkpoints 4 and 8) and its corpus, copied by each test."""
  root = tmp_path_factory.mktemp("trained_to_step_8")
  corpus = root / "corpus.txt"
  corpus.write_text(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"),
                    encoding="utf-8")
  trainer.run(str(root / "run"), [tiny_stage(corpus, 8)], trainer=QUIET)
  return root / "run", corpus


@pytest.mark.slow  # Default suite under 15 minutes; .ci/run runs the slow tests.
@pytest.mark.parametrize("damage", ["truncate_array_file", "delete_meta_item",
                                    "delete_tree_metadata", "garble_record", "damage_manifest"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, trained_to_step_8,
                                                                 caplog, damage):
  trained, small_text_file = trained_to_step_8
  model_dir = tmp_path / "run"
  shutil.copytree(trained, model_dir)
  newest = model_dir / "checkpoints" / "8"
  if damage == "truncate_array_file":
    victim = _biggest_file(newest / "state")
    os.truncate(victim, os.path.getsize(victim) // 2)
  elif damage == "delete_meta_item":
    shutil.rmtree(newest / "meta")
  elif damage == "delete_tree_metadata":  # A crash during a copy, or a partial sync.
    os.remove(newest / "state" / "_METADATA")
  elif damage == "garble_record":
    (newest / "meta" / "metadata").write_text('{"stage_index": ', encoding="utf-8")
  else:
    (newest / "state" / "manifest.ocdbt").write_bytes(b"\0" * 16)
  with caplog.at_level("INFO", logger="jaxlm"):
    result = trainer.run(str(model_dir), [tiny_stage(small_text_file, 8)], trainer=QUIET)
  assert "checkpoint 8 is unreadable" in caplog.text and "falling back" in caplog.text
  assert "resuming from step 4" in caplog.text
  assert result["step"] == 8
  assert len(os.listdir(model_dir / CORRUPT_DIR)) == 1  # Kept aside, not deleted.
  assert Checkpointer(str(model_dir)).all_steps() == [4, 8]


class _BadDataAt:
  """Wraps the train batches: NaN loss weights on chosen steps (a corrupt-data fault)."""

  def __init__(self, batches, bad_steps):
    self.batches, self.bad_steps = batches, set(bad_steps)

  def __getattr__(self, name):
    return getattr(self.batches, name)

  def batch_at(self, step):
    batch = self.batches.batch_at(step)
    if step in self.bad_steps:
      batch = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
    return batch


def _inject_nan(monkeypatch, bad_steps):
  build = run_plan.build_datasets

  def build_with_bad_data(*args, **kwargs):
    datasets = build(*args, **kwargs)
    return dataclasses.replace(datasets, train=_BadDataAt(datasets.train, bad_steps))

  monkeypatch.setattr(run_plan, "build_datasets", build_with_bad_data)  # Every stage's data.


def test_nan_steps_are_skipped_counted_and_params_stay_finite(tmp_path, small_text_file,
                                                               monkeypatch):
  _inject_nan(monkeypatch, {2, 3, 9})
  result = trainer.run(str(tmp_path / "run"), [tiny_stage(small_text_file, 12)], trainer=QUIET)
  assert result["train/skipped_steps"] == 3
  params = _raw_params(tmp_path / "run", 12)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_too_many_consecutive_nan_steps_stop_the_run(tmp_path, small_text_file, monkeypatch):
  _inject_nan(monkeypatch, {5, 6, 7, 8, 9})
  config = QUIET.__class__(**{**QUIET.__dict__, "max_consecutive_nonfinite": 3})
  with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
    trainer.run(str(tmp_path / "run"), [tiny_stage(small_text_file, 12)], trainer=config)
  # Checkpoints stop at the streak, and every one of them holds finite params (the step-8
  # one was saved mid-streak: its bad updates were skipped, never applied).
  steps = Checkpointer(str(tmp_path / "run")).all_steps()
  assert steps == [4, 8]
  for step in steps:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_raw_params(tmp_path / "run", step)))


def test_a_skipped_step_leaves_params_and_optimizer_state_untouched(small_text_file):
  stage = tiny_stage(small_text_file, 8)
  mesh_config = parallel.MeshConfig()
  mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
  shardings = state_shardings(stage, mesh, rules)
  step_fn = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))
  state = sharded_init(stage, shardings, jax.random.key(0))
  before = jax.device_get(state)
  batch = {"inputs": np.ones((4, 64), np.int32), "targets": np.ones((4, 64), np.int32),
           "positions": np.tile(np.arange(64, dtype=np.int32), (4, 1)),
           "segment_ids": np.ones((4, 64), np.int32), "weights": np.full((4, 64), np.nan, np.float32)}
  after, metrics = step_fn(state, batch)
  assert float(metrics["train/nonfinite"]) == 1.0
  assert int(after.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before.params, jax.device_get(after.params))
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, jax.device_get(after.opt_state))


def test_restore_with_an_assignment_map_into_a_model_with_one_extra_layer(tmp_path,
                                                                          small_text_file,
                                                                          monkeypatch):
  source_dir = tmp_path / "source"
  trainer.run(str(source_dir), [tiny_stage(small_text_file, 4)], trainer=QUIET)
  source = _raw_params(source_dir, 4)
  deeper = ModelConfig(**{**TINY.__dict__, "num_layers": 3})
  stage = tiny_stage(small_text_file, 4, model=deeper)
  mesh_config = parallel.MeshConfig()
  mesh = parallel.make_mesh(mesh_config)
  fresh = sharded_init(stage, state_shardings(stage, mesh, mesh_config.resolved_rules()),
                       jax.random.key(7))
  fresh_params = jax.device_get(fresh.params)

  # Default map: same names load, the new layer_2 stays freshly initialised. Weights only: each
  # param is read alone, never the source's whole state with its optimizer moments.
  def whole_state_read(*_):
    raise AssertionError("a weights-only restore read the whole source state")
  with monkeypatch.context() as patch:
    patch.setattr(Checkpointer, "restore_state", whole_state_read)
    restored, report = restore_into(RestoreConfig(path=str(source_dir)), fresh,
                                    stage.make_optimizer(), str(tmp_path))
  params = jax.device_get(restored.params)
  for name in ("layer_0", "layer_1", "embed", "lm_head", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, params[name], source[name])
  jax.tree.map(np.testing.assert_array_equal, params["layer_2"], fresh_params["layer_2"])
  assert sorted(report.created) == sorted(
      f"params/layer_2/{p}" for p in ("attention/key", "attention/out", "attention/query",
                                      "attention/value", "attention_norm/scale", "mlp/down",
                                      "mlp/gate", "mlp/up", "mlp_norm/scale"))
  assert ("params/layer_0/mlp/up", "params/layer_0/mlp/up") in report.loaded
  assert report.skipped == []
  saved = json.loads((tmp_path / "restore_report.json").read_text())
  assert saved["created"] == report.created and len(saved["loaded"]) == len(report.loaded)

  # A rule: the new top layer copies the old top layer (stacking); layer_0 is left fresh.
  rules = (("layer_2/(.*)", r"layer_1/\1"), ("layer_0/.*", None))
  restored, report = restore_into(RestoreConfig(path=str(source_dir), assignment_map=rules),
                                  fresh, stage.make_optimizer(), str(tmp_path))
  params = jax.device_get(restored.params)
  jax.tree.map(np.testing.assert_array_equal, params["layer_2"], source["layer_1"])
  jax.tree.map(np.testing.assert_array_equal, params["layer_0"], fresh_params["layer_0"])
  assert all(name.startswith("params/layer_0/") for name in report.created)
  assert len(report.skipped) == 9 and all(s.startswith("params/layer_0/") for s in report.skipped)


def test_restore_errors_are_clear(tmp_path, small_text_file):
  stage = tiny_stage(small_text_file, 4)
  mesh_config = parallel.MeshConfig()
  mesh = parallel.make_mesh(mesh_config)
  fresh = sharded_init(stage, state_shardings(stage, mesh, mesh_config.resolved_rules()),
                       jax.random.key(0))
  with pytest.raises(UserError, match="no checkpoints/ folder"):
    restore_into(RestoreConfig(path=str(tmp_path / "nowhere")), fresh, stage.make_optimizer(),
                 str(tmp_path))
  trainer.run(str(tmp_path / "source"), [tiny_stage(small_text_file, 4)], trainer=QUIET)
  with pytest.raises(UserError, match="not in the checkpoint"):
    restore_into(RestoreConfig(path=str(tmp_path / "source"),
                               assignment_map=(("layer_1/(.*)", r"layer_9/\1"),)),
                 fresh, stage.make_optimizer(), str(tmp_path))
  with pytest.raises(UserError, match="shapes differ"):
    restore_into(RestoreConfig(path=str(tmp_path / "source"),
                               assignment_map=(("layer_0/mlp/up", "layer_0/mlp/down"),)),
                 fresh, stage.make_optimizer(), str(tmp_path))


def test_preflight_refuses_a_model_dir_without_space_for_one_checkpoint(tmp_path,
                                                                      small_text_file,
                                                                      monkeypatch):
  monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: os.statvfs_result((0,) * 10)
                      and type("Usage", (), {"free": 1024})())
  with pytest.raises(UserError, match="MiB free but one checkpoint needs"):
    trainer.run(str(tmp_path / "run"), [tiny_stage(small_text_file, 4)], trainer=QUIET)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # Failed before anything else.


def test_keep_policy_keeps_the_last_n_plus_every_kth(tmp_path, small_text_file):
  config = QUIET.__class__(**{**QUIET.__dict__, "checkpoint_every": 2, "keep_checkpoints": 2,
                              "keep_checkpoint_every": 4})
  trainer.run(str(tmp_path / "run"), [tiny_stage(small_text_file, 12)], trainer=config)
  assert Checkpointer(str(tmp_path / "run")).all_steps() == [4, 8, 10, 12]


@pytest.mark.slow  # Default suite under 15 minutes; .ci/run runs the slow tests.
def test_the_applied_learning_rate_follows_each_stage_schedule_on_the_trainer_step(
    tmp_path, small_text_file, monkeypatch):
  """Issue 12, bug 1: the learning rate set into the optimizer state (and logged) is the stage's
  schedule at the trainer's stage step, also when stage 2 keeps stage 1's moments (and so
  optax's own update count) and after skipped (non-finite) steps."""
  schedules = {"first": lambda n: warmup_cosine(n, peak_lr=3e-3, warmup_steps=2),
               "second": lambda n: warmup_cosine(n, peak_lr=1e-3, warmup_steps=3)}
  stages = [tiny_stage(small_text_file, 5, name="first", schedule=schedules["first"]),
            tiny_stage(small_text_file, 5, name="second", schedule=schedules["second"],
                   keep_optimizer_state=True)]
  _inject_nan(monkeypatch, {2})  # Stage step 2 of each stage: global steps 2 and 7 skip.
  config = dataclasses.replace(QUIET, log_every=1, checkpoint_every=None)
  result = trainer.run(str(tmp_path / "run"), stages, trainer=config)
  assert result["train/skipped_steps"] == 2
  applied = {r["step"]: r["train/learning_rate"] for r in metric_records(tmp_path / "run")
             if "train/learning_rate" in r}
  assert sorted(applied) == list(range(1, 11))
  for logged_step, lr in applied.items():
    step = logged_step - 1  # The step the update was made at.
    name, start = ("first", 0) if step < 5 else ("second", 5)
    expected = float(schedules[name](5)(step - start))
    # Both are the same float32 schedule, evaluated inside and outside the jitted step.
    assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12), (logged_step, lr, expected)
  assert applied[6] == 0.0  # Stage 2 re-warms from 0 although its kept optax count is 5.
  final = raw_state(tmp_path / "run", 10)
  assert float(final["opt_state"]["hyperparams"]["learning_rate"]) == pytest.approx(
      float(schedules["second"](5)(4)), rel=1e-6)


def test_the_update_is_made_with_the_injected_learning_rate(small_text_file):
  """With plain SGD the update is exactly -lr * gradient: the injected rate is the one applied."""
  stage = tiny_stage(small_text_file, 10, optimizer=optax.sgd,
                 schedule=lambda n: optax.linear_schedule(0.5, 0.0, n))
  mesh_config = parallel.MeshConfig()
  mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
  shardings = state_shardings(stage, mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  step = make_train_step(stage, shardings, batch_sharding, stage_start=4)
  state = sharded_init(stage, shardings, jax.random.key(0)).replace(step=jnp.asarray(7))
  batch = build_datasets(stage.data).train.batch_at(0)
  grads = jax.jit(jax.grad(lambda p: _mean_loss(p, stage, batch)))(state.params)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, parallel.global_batch(batch, batch_sharding))
  lr = 0.5 * (1 - 3 / 10)  # The schedule at stage step 7 - 4 = 3.
  assert float(metrics["train/learning_rate"]) == pytest.approx(lr, rel=1e-6)
  for name, new in flatten_names(state.params).items():
    np.testing.assert_allclose(new, flatten_names(before)[name] - lr * flatten_names(grads)[name],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # Default suite under 15 minutes; .ci/run runs the slow tests.
def test_a_later_stage_continues_each_source_and_resumes_mid_stage_bitwise(
    tmp_path, small_text_file, monkeypatch):
  """Issue 12, bug 2: stage 2 on stage 1's source draws rows stage 1 never drew (unless it
  restarts the source), and a run killed in stage 2 resumes to the same params, bit for bit."""
  built = []  # Every stage's train batches, in the order the run builds them.
  build = run_plan.build_datasets

  def recording(*args, **kwargs):
    datasets = build(*args, **kwargs)
    built.append(datasets.train)
    return datasets

  monkeypatch.setattr(run_plan, "build_datasets", recording)
  stages = [tiny_stage(small_text_file, 5, name="first"), tiny_stage(small_text_file, 5, name="second")]
  config = dataclasses.replace(QUIET, checkpoint_every=2, keep_checkpoints=None)
  trainer.run(str(tmp_path / "full"), stages, trainer=config)

  def rows(batches):
    return {ref for step in range(5) for ref in batches.row_refs_at(step)}

  first, second = map(rows, built)
  assert len(first) == len(second) == 20 and not first & second

  built.clear()
  restarted = [stages[0], dataclasses.replace(stages[1], restart_sources=("text",))]
  trainer.run(str(tmp_path / "restart"), restarted, trainer=config)
  assert rows(built[1]) == first  # The same rows again, in the same order of steps.

  # Killed after step 7 (stage 2): its later checkpoints never happened.
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  for step in ("8", "10"):
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
  trainer.run(str(tmp_path / "resumed"), stages, trainer=config)
  full, resumed = _raw_params(tmp_path / "full", 10), _raw_params(tmp_path / "resumed", 10)
  for name, value in flatten_names(full).items():
    np.testing.assert_array_equal(flatten_names(resumed)[name], value, err_msg=name)


def test_a_resume_at_a_stage_boundary_logs_the_next_stages_start_once(tmp_path):
  """Killed after stage 1's last checkpoint (step 8) but after stage 2 had logged its start
  (data proportions, baseline evaluation): the resumed run starts stage 2 again, so those
  records go with what came after the checkpoint; stage 1's own records at step 8 stay."""
  from jaxlm.training.metrics import MetricsWriter  # pylint: disable=import-outside-toplevel
  lines = [{"step": 7, "train/loss": 2.0}, {"step": 8, "train/loss": 1.9},
           {"step": 8, "eval_final/loss": 1.8},                     # stage 1 ends
           {"step": 8, "data/proportion/wiki": 1.0}, {"step": 8, "eval/loss": 1.8},  # stage 2
           {"step": 9, "train/loss": 1.7}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 10, "tra')
  writer = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=8)
  writer.write(8, {"data/proportion/wiki": 1.0})
  writer.write(8, {"eval/loss": 1.8})
  writer.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == lines[:5]
