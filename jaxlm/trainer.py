"""The training loop: eval / checkpoint / log cadence around the jitted step (train_step.py).

`run` trains a list of stages (stages.py) on a device mesh (parallel.py), resuming from the
latest checkpoint in model_dir.
"""

import dataclasses
import logging
import os
import tempfile
import time
from typing import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np

from jaxlm import evaluate, flops, parallel
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.pipeline import build_datasets
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError
from jaxlm.metrics import MetricsWriter, Progress
from jaxlm.model import count_params
from jaxlm.stages import TRANSITIONS, Stage, stage_starts
from jaxlm.train_step import (TrainState, abstract_state, make_eval_step, make_train_step,
                              sharded_init, state_shardings)

log = logging.getLogger("jaxlm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int = 500
  max_checkpoints_to_keep: int = 3
  microbatches: int = 1  # Gradient accumulation: the global batch is split into this many.
  progress: str = "auto"  # "auto" (bar on a terminal), "bar" or "log".
  tensorboard: bool = True
  peak_flops_per_device: float | None = None  # None: measure a matmul at start-up.
  sample_prompt: str = "def "
  sample_tokens: int = 200
  sample_temperature: float = 0.8


def prepare_model_dir(model_dir: str) -> None:
  """Fail before any compilation if model_dir cannot hold our files."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".write_probe"):
      pass
  except OSError as e:
    raise UserError(f"MODEL_DIR {model_dir!r} is not writable ({e.strerror}); choose another "
                    "--gin.MODEL_DIR") from None


def host_rows(batch: dict) -> dict:
  """This process's contiguous block of a global host batch (all of it on one host)."""
  count, index = jax.process_count(), jax.process_index()
  rows = next(iter(batch.values())).shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


class _Run:
  """The per-run context shared by all stages: mesh, writers, checkpointer."""

  def __init__(self, model_dir: str, stages: Sequence[Stage], seed: int, trainer: TrainerConfig,
               mesh_config: parallel.MeshConfig):
    self.model_dir, self.stages, self.seed, self.trainer = model_dir, list(stages), seed, trainer
    self.mesh = parallel.make_mesh(mesh_config)
    self.rules = mesh_config.resolved_rules()
    self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
    self.starts = stage_starts(self.stages)
    self.total_steps = self.starts[-1] + self.stages[-1].num_steps
    self.checkpointer = Checkpointer(model_dir, trainer.max_checkpoints_to_keep)
    self.writer = MetricsWriter(model_dir, trainer.tensorboard)
    self.peak_flops = trainer.peak_flops_per_device
    self.final_metrics: dict[str, float] = {}
    log.info("mesh %s over %d devices (%d processes), rules %s",
             dict(self.mesh.shape), self.mesh.size, jax.process_count(),
             mesh_config.rules if isinstance(mesh_config.rules, str) else self.rules)

  def to_device(self, host_batch: dict) -> dict:
    return parallel.global_batch(host_rows(host_batch), self.batch_sharding)

  def restore_or_init(self) -> tuple[TrainState, int]:
    step = self.checkpointer.latest_step()
    if step is None:
      stage = self.stages[0]
      return sharded_init(stage, state_shardings(stage, self.mesh, self.rules),
                          jax.random.key(self.seed)), 0
    index = int(self.checkpointer.restore_meta(step)["stage_index"])
    if index >= len(self.stages) or not (self.starts[index] <= step
                                         <= self.starts[index] + self.stages[index].num_steps):
      raise UserError(f"the checkpoint at step {step} in {self.checkpointer.directory} does not fit "
                      "this run's stages; use a new MODEL_DIR or restore the original config")
    stage = self.stages[index]
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state(stage), state_shardings(stage, self.mesh, self.rules))
    log.info("resuming from step %d (stage %d, %r)", step, index, stage.name)
    return self.checkpointer.restore_state(step, target), index

  def transition(self, state: TrainState, previous: Stage, following: Stage) -> TrainState:
    log.info("stage transition %r -> %r via %r", previous.name, following.name,
             following.transition)
    params = TRANSITIONS[following.transition](state.params, previous, following)
    shardings = state_shardings(following, self.mesh, self.rules)
    params = jax.device_put(params, shardings.params)
    if following.keep_optimizer_state:
      if jax.tree.structure(shardings.opt_state) != jax.tree.structure(state.opt_state):
        raise UserError(f"stage {following.name!r}: keep_optimizer_state needs the same "
                        "optimizer and parameter shapes as the previous stage")
      opt_state = state.opt_state
    else:
      opt_state = jax.jit(following.make_optimizer().init,
                          out_shardings=shardings.opt_state)(params)
    return TrainState(state.step, params, opt_state)

  def save(self, state: TrainState, stage_index: int) -> None:
    self.checkpointer.save(int(state.step), state, {"stage_index": stage_index,
                                                    "stage_name": self.stages[stage_index].name})

  def train_stage(self, state: TrainState, index: int) -> TrainState:
    stage, start, trainer = self.stages[index], self.starts[index], self.trainer
    end = start + stage.num_steps
    if int(state.step) >= end:
      return state
    cfg, data_cfg = stage.model, stage.data
    cfg.check_seq_len(data_cfg.seq_len)
    batch_devices = int(np.prod([self.mesh.shape[a] for a in parallel.BATCH_AXES]))
    if data_cfg.batch_size % (trainer.microbatches * batch_devices):
      raise UserError(f"batch_size={data_cfg.batch_size} must divide into microbatches="
                      f"{trainer.microbatches} x {batch_devices} data-parallel devices")
    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > cfg.vocab_size:
      raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but ModelConfig.vocab_size="
                      f"{cfg.vocab_size}; raise vocab_size")
    train_batches, eval_batches = build_datasets(data_cfg, tokenizer)
    byte_lengths = tokenizer.byte_lengths()
    shardings = state_shardings(stage, self.mesh, self.rules)
    train_step = make_train_step(stage, shardings, self.batch_sharding, trainer.microbatches)
    eval_step = make_eval_step(stage, shardings.params, self.batch_sharding)
    schedule = stage.schedule(stage.num_steps)
    tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
    flops_per_step = flops.flops_per_token(cfg, data_cfg.seq_len) * tokens_per_step
    if self.peak_flops is None:
      self.peak_flops = flops.measure_peak_flops(cfg.dtype)
    log.info("stage %r: steps %d..%d, %s params (%s bytes per device with optimizer state), "
             "%.3g model FLOPs/token, peak %.3g FLOP/s/device", stage.name, start, end,
             f"{count_params(state.params):,}", f"{parallel.per_device_bytes(state):,}",
             flops_per_step / tokens_per_step, self.peak_flops)

    progress = Progress(self.total_steps, int(state.step), trainer.progress)
    step = int(state.step)
    pending, clock, clock_step = [], None, step
    while step < end:
      state, metrics = train_step(state, self.to_device(train_batches.batch_at(step - start)))
      step += 1
      pending.append(metrics)
      progress.advance(step)
      if clock is None:  # Start the clock after the first step so compilation is not counted.
        jax.block_until_ready(metrics)
        clock, clock_step = time.perf_counter(), step
      if step % trainer.log_every == 0 or step == end:
        host = jax.device_get(pending)
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        scalars["train/learning_rate"] = float(schedule(step - start - 1))
        if step > clock_step:
          step_time = (time.perf_counter() - clock) / (step - clock_step)
          scalars.update({
              "perf/step_time_sec": step_time,
              "perf/tokens_per_sec": tokens_per_step / step_time,
              "perf/mfu": flops_per_step / step_time / (self.peak_flops * jax.device_count()),
          })
        self.writer.write(step, scalars)
        self.final_metrics.update(scalars)
        progress.report(step, scalars)
        pending, clock, clock_step = [], time.perf_counter(), step
      if step % trainer.eval_every == 0 or step == end:
        results = evaluate.evaluate(eval_step, state.params, eval_batches, byte_lengths,
                                    self.to_device)
        self.writer.write(step, results)
        progress.message(f"step {step}: eval loss {results['eval/loss']:.4f}, "
                         f"{results['eval/bits_per_byte']:.4f} bits/byte")
        self.final_metrics.update(results)
        clock, clock_step = time.perf_counter(), step
      if step % trainer.checkpoint_every == 0 or step == end:
        self.save(state, index)
    progress.close()
    return state

  def sample(self, state: TrainState, stage: Stage) -> str:
    tokenizer = ByteTokenizer()
    prompt = [tokenizer.bos_id, *tokenizer.encode(self.trainer.sample_prompt)]
    ids = evaluate.generate(state.params, stage.model, prompt, self.trainer.sample_tokens,
                            jax.random.key(self.seed + 1), self.trainer.sample_temperature)
    return self.trainer.sample_prompt + tokenizer.decode(ids)


@gin.configurable
def run(model_dir: str = gin.REQUIRED, stages: Sequence[Stage] = gin.REQUIRED, seed: int = 0,
        trainer: TrainerConfig | None = None,
        mesh: parallel.MeshConfig | None = None) -> dict[str, float]:
  """Train `stages` in order into model_dir, resuming from its latest checkpoint. Returns the last
  logged metrics."""
  if not stages:
    raise UserError("run.stages is empty; give at least one Stage")
  prepare_model_dir(model_dir)
  ctx = _Run(model_dir, stages, seed, trainer or TrainerConfig(), mesh or parallel.MeshConfig())
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin.config_str())
  # The mesh and rules are active while steps trace, so the model's logical constraints apply.
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    try:
      state, index = ctx.restore_or_init()
      for i in range(index, len(ctx.stages)):
        if i > index:
          state = ctx.transition(state, ctx.stages[i - 1], ctx.stages[i])
        state = ctx.train_stage(state, i)
    finally:
      ctx.checkpointer.close()
      ctx.writer.close()
    if ctx.trainer.sample_tokens > 0:
      log.info("sample:\n%s", ctx.sample(state, ctx.stages[-1]))
  return {"step": int(state.step), **ctx.final_metrics}
