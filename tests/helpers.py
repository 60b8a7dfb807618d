"""What several test modules share: the tiny model and stage the trainer tests use, the kill -9
and resume harness, growth checks, and a random batch. Tests import from here, never from each
other."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO_ROOT, quick_run_args
from jaxlm import parallel
from jaxlm.training import trainer
from jaxlm.checkpointing.checkpoint import Checkpointer
from jaxlm.data.pipeline import DataConfig
from jaxlm.data.sources import text_files
from jaxlm.methods.growth.width import exact_norm_eps, grow_width
from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.optim.schedules import warmup_cosine
from jaxlm.training.stages import Stage
from jaxlm.methods.transition import TransitionContext, identity
from jaxlm.training.train_step import init_state
from jaxlm.tree_names import flatten_names

TINY = ModelConfig(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=192, max_seq_len=128)


QUIET = trainer.TrainerConfig(log_every=2, checkpoint_every=4, progress="log",
                              tensorboard=False, peak_flops_per_device=1e12, sample_tokens=0)


def tiny_data(path, **overrides):
  return DataConfig(**{"source": lambda: text_files(str(path)), "seq_len": 64, "batch_size": 4,
                       "max_eval_batches": 2, **overrides})


def tiny_stage(path, num_steps, **overrides):
  return Stage(**{"num_steps": num_steps, "model": TINY, "data": tiny_data(path),
                  "schedule": lambda n: warmup_cosine(n, peak_lr=3e-3, warmup_steps=2),
                  **overrides})


def final_params(model_dir):
  ckpt = Checkpointer(str(model_dir))
  step = ckpt.latest_step()
  abstract = jax.eval_shape(lambda: init_state(tiny_stage("unused", 8), jax.random.key(0)))
  state = ckpt.restore_state(step, abstract)
  ckpt.close()
  return step, state.params


def metric_records(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def last_logged_step(model_dir):
  try:
    with open(os.path.join(model_dir, "metrics.jsonl"), "rb") as f:
      lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0
  except (OSError, ValueError, IndexError):
    return 0


def start_and_wait_for(args, model_dir, step):
  process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while last_logged_step(model_dir) < step:
    assert process.poll() is None, process.stderr.read()[-2000:]
    assert time.time() < deadline
    time.sleep(0.01)
  return process


def kill_once_logged(args, model_dir, step):
  """Starts the run and SIGKILLs it once `step` is logged; returns the dead process."""
  process = start_and_wait_for(args, model_dir, step)
  process.send_signal(signal.SIGKILL)
  process.wait()
  return process


def resume(args):
  """Runs `args` to the end, which must resume from a checkpoint."""
  resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step" in resumed.stderr


def assert_same_saved_state(reference, other, step):
  """The two runs' checkpoints at `step` are bitwise equal, tensor by tensor; returns other's."""
  want, got = raw_state(reference, step), raw_state(other, step)
  for name, value in flatten_names(want).items():
    np.testing.assert_array_equal(flatten_names(got)[name], value, err_msg=name)
  return got


def raw_state(model_dir, step):
  """The saved train state as nested dicts and lists (restored without a target)."""
  checkpointer = Checkpointer(str(model_dir), read_only=True)
  state = checkpointer.restore_state(step)
  checkpointer.close()
  return state


EXACT = 1e-5


def trained_like(config, seed=0):
  """Random params with every leaf perturbed, so norms and copies are not trivially 1 or 0."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def growth_tokens(config):
  return jax.random.randint(jax.random.key(9), (2, 16), 0, config.vocab_size)


def logit_error(small_params, small, large_params, large) -> float:
  tokens = growth_tokens(small)
  return float(jnp.max(jnp.abs(forward(large_params, large, tokens)
                               - forward(small_params, small, tokens))))


def wider(small, **sizes):
  large = dataclasses.replace(small, **sizes)
  if large.d_model != small.d_model:
    large = dataclasses.replace(large, norm_eps=exact_norm_eps(small, large.d_model))
  return large


def growth_ctx(small, large, methods=(), transition=identity, keep=False):
  return TransitionContext(Stage(model=small, num_steps=1),
                           Stage(model=large, num_steps=1, methods=methods,
                                 transition=transition, keep_optimizer_state=keep),
                           jax.random.key(5))


def mesh_and_rules():
  config = parallel.MeshConfig()
  return parallel.make_mesh(config), config.resolved_rules()


def random_batch(stage, rows=4):
  tokens = np.random.default_rng(0).integers(1, 200, (rows, stage.data.seq_len + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(stage.data.seq_len), (rows, stage.data.seq_len)),
          "segment_ids": jnp.ones((rows, stage.data.seq_len), jnp.int32),
          "weights": jnp.ones((rows, stage.data.seq_len), jnp.float32)}


def check_exact_width_growth(name, small, sizes, modes):
  """Width growth of `small` by `sizes` in `modes` has the large model's shapes and keeps the
  logits within EXACT."""
  large = wider(small, **sizes)
  if modes.get("d_model") == "copy":
    large = dataclasses.replace(large, norm_eps=small.norm_eps)  # Copies keep the RMS itself.
  params = trained_like(small)
  grown = grow_width(params, small, large, init_params(large, jax.random.key(3)), **modes)
  assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, init_params(large,
                                                                               jax.random.key(0)))
  error = logit_error(params, small, grown, large)
  print(f"{name}: max |dlogit| {error:.2e}")
  assert error < EXACT


def cli_run_args(model_dir, corpus, gin_file):
  """`python -m jaxlm.train` of `gin_file` on `corpus`, logging every step, checkpointing every
  other one, evaluating never."""
  return [sys.executable, "-m", "jaxlm.train", *quick_run_args(
      model_dir, corpus, f"--gin_file={gin_file}", "--gin.TrainerConfig.log_every=1",
      "--gin.TrainerConfig.checkpoint_every=2", "--gin.EvalConfig.every=1000",
      "--gin.EvalConfig.baseline=False",
      "--gin.TrainerConfig.sample_tokens=0", "--gin.TrainerConfig.progress='log'")]


def mesh_flags(data, fsdp, tensor):
  return [f"--gin.MeshConfig.data={data}", f"--gin.MeshConfig.fsdp={fsdp}",
          f"--gin.MeshConfig.tensor={tensor}"]


def run_mesh_worker(model_root, corpus, devices, runs):
  """Start tests/mesh_worker.py with `devices` CPU devices; returns its Popen."""
  spec = {"model_dir": str(model_root / "runs"), "corpus": str(corpus), "runs": runs}
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen([sys.executable, "tests/mesh_worker.py", json.dumps(spec)],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def mesh_result(process):
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def run_to_the_end(args, cwd=None):
  """Runs `args` (a `python -m jaxlm.train` command) to the end; it must succeed."""
  done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd)
  assert done.returncode == 0, done.stderr[-2000:]


def gin_run_resumes_bitwise(tmp_path, corpus, gin_text, kill_after, final_step, monkeypatch):
  """A run of `gin_text` (a gin file's text) to the end, and the same run SIGKILLed once step
  `kill_after` is logged and resumed: both save the same state at `final_step` (returned)."""
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(gin_text, encoding="utf-8")
  monkeypatch.chdir(REPO_ROOT)  # quick_run_args name the experiment relative to the repository.
  run_to_the_end(cli_run_args(tmp_path / "reference", corpus, gin_file))
  return killed_run_resumes_bitwise(tmp_path / "reference", tmp_path / "killed", corpus,
                                    gin_file, kill_after, final_step)


def killed_run_resumes_bitwise(reference, killed, corpus, gin_file, kill_after, final_step):
  """The run of `gin_file` SIGKILLed once step `kill_after` is logged, then started again, saves
  at `final_step` exactly what `reference` (the same run, never stopped) saved; returns that
  saved state."""
  kill_once_logged(cli_run_args(killed, corpus, gin_file), killed, kill_after)
  resume(cli_run_args(killed, corpus, gin_file))
  return assert_same_saved_state(reference, killed, final_step)
