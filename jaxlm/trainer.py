"""The training loop: eval / checkpoint / log cadence around the jitted step (train_step.py).

`run` trains a list of stages (stages.py) on a device mesh (parallel.py), resuming from the
newest intact checkpoint in model_dir, and stops cleanly on SIGTERM/SIGINT (preemption.py).
"""

import dataclasses
import logging
import os
import shutil
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
from jaxlm.errors import TrainingDiverged, UserError
from jaxlm.metrics import MetricsWriter, Progress
from jaxlm.model import count_params
from jaxlm.preemption import PreemptionGuard
from jaxlm.restore import restore_into
from jaxlm.stages import TRANSITIONS, Stage, stage_starts
from jaxlm.train_step import (TrainState, abstract_state, all_finite, make_eval_step,
                              make_train_step, sharded_init, state_shardings)

log = logging.getLogger("jaxlm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int | None = 500  # Steps; the end of every stage is always saved.
  checkpoint_every_secs: float | None = None  # Wall-clock cadence (either may trigger a save).
  keep_checkpoints: int | None = 3  # The newest N ...
  keep_checkpoint_every: int | None = None  # ... plus every step divisible by this.
  max_consecutive_nonfinite: int = 10  # Skipped updates in a row before stopping (0: never).
  microbatches: int = 1  # Gradient accumulation: the global batch is split into this many.
  progress: str = "auto"  # "auto" (bar on a terminal), "bar" or "log".
  tensorboard: bool = True
  peak_flops_per_device: float | None = None  # None: measure a matmul at start-up.
  sample_prompt: str = "def "
  sample_tokens: int = 200
  sample_temperature: float = 0.8


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def prepare_model_dir(model_dir: str, checkpoint_bytes: int) -> None:
  """Fail before any compilation if model_dir cannot hold one more checkpoint."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".write_probe"):
      pass
  except OSError as e:
    raise UserError(f"MODEL_DIR {model_dir!r} is not writable ({e.strerror}); choose another "
                    "--gin.MODEL_DIR") from None
  free = shutil.disk_usage(model_dir).free
  if free < checkpoint_bytes:
    raise UserError(f"MODEL_DIR {model_dir!r} has {free / 2**20:,.1f} MiB free but one "
                    f"checkpoint needs about {checkpoint_bytes / 2**20:,.1f} MiB; free space or "
                    "choose another --gin.MODEL_DIR")


def host_rows(batch: dict) -> dict:
  """This process's contiguous block of a batch every host holds whole (eval batches)."""
  count, index = jax.process_count(), jax.process_index()
  rows = next(iter(batch.values())).shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


class _Run:
  """The per-run context shared by all stages: mesh, writers, checkpointer, fault counters."""

  def __init__(self, model_dir: str, stages: Sequence[Stage], seed: int, trainer: TrainerConfig,
               mesh_config: parallel.MeshConfig):
    self.model_dir, self.stages, self.seed, self.trainer = model_dir, list(stages), seed, trainer
    self.mesh = parallel.make_mesh(mesh_config)
    self.rules = mesh_config.resolved_rules()
    self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
    self.starts = stage_starts(self.stages)
    self.total_steps = self.starts[-1] + self.stages[-1].num_steps
    self.checkpointer = Checkpointer(
        model_dir, every_steps=trainer.checkpoint_every, every_secs=trainer.checkpoint_every_secs,
        keep_last=trainer.keep_checkpoints, keep_every=trainer.keep_checkpoint_every)
    self.writer = None  # Opened once the resume step is known.
    self.tokenizer = None  # The current stage's (DataConfig.tokenizer).
    self.peak_flops = trainer.peak_flops_per_device
    self.final_metrics: dict[str, float] = {}
    self.skipped_steps, self.nonfinite_streak, self.preempted = 0, 0, False
    self.last_saved_step = None
    log.info("mesh %s over %d devices (%d processes), rules %s",
             dict(self.mesh.shape), self.mesh.size, jax.process_count(),
             mesh_config.rules if isinstance(mesh_config.rules, str) else self.rules)

  def to_device(self, host_batch: dict) -> dict:
    """A batch every host holds whole -> one global array per field."""
    return parallel.global_batch(host_rows(host_batch), self.batch_sharding)

  def evaluate(self, eval_step, params, eval_sets: dict, byte_lengths) -> dict[str, float]:
    """Loss and bits per byte on each domain's validation set, and over all of them."""
    results, nats, targets, bits, num_bytes = {}, 0.0, 0.0, 0.0, 0.0
    for domain, batches in eval_sets.items():
      r = evaluate.evaluate(eval_step, params, batches, byte_lengths, self.to_device)
      results[f"eval/{domain}/loss"] = r["eval/loss"]
      results[f"eval/{domain}/bits_per_byte"] = r["eval/bits_per_byte"]
      nats, targets = nats + r["eval/loss"] * r["eval/targets"], targets + r["eval/targets"]
      bits, num_bytes = bits + r["eval/bits_per_byte"] * r["eval/bytes"], num_bytes + r["eval/bytes"]
    results.update({"eval/loss": nats / max(targets, 1.0),
                    "eval/bits_per_byte": bits / max(num_bytes, 1.0), "eval/targets": targets})
    return results

  def _restore_target(self, meta: dict) -> TrainState:
    index, step = int(meta["stage_index"]), int(meta["step"])
    if index >= len(self.stages) or not (self.starts[index] <= step
                                         <= self.starts[index] + self.stages[index].num_steps):
      raise UserError(f"the checkpoint at step {step} in {self.checkpointer.directory} does not fit "
                      "this run's stages; use a new MODEL_DIR or restore the original config")
    stage = self.stages[index]
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state(stage), state_shardings(stage, self.mesh, self.rules))

  def restore_or_init(self) -> tuple[TrainState, int]:
    found = self.checkpointer.restore_latest(self._restore_target)
    if found is None:
      self.writer = MetricsWriter(self.model_dir, self.trainer.tensorboard, resume_step=0)
      return self.start_stage(None, 0), 0
    step, meta, state = found
    self.skipped_steps = int(meta.get("skipped_steps", 0))
    self.writer = MetricsWriter(self.model_dir, self.trainer.tensorboard, resume_step=step)
    log.info("resuming from step %d (stage %d, %r)", step, meta["stage_index"], meta["stage_name"])
    return state, int(meta["stage_index"])

  def start_stage(self, state: TrainState | None, index: int) -> TrainState:
    """The state a stage starts from: fresh (first stage), the previous stage's state through
    the stage's transition, and/or tensors restored from another run (`Stage.restore_from`)."""
    stage = self.stages[index]
    shardings = state_shardings(stage, self.mesh, self.rules)
    if state is None:
      state = sharded_init(stage, shardings, jax.random.key(self.seed))
    else:
      previous = self.stages[index - 1]
      log.info("stage transition %r -> %r via %r", previous.name, stage.name, stage.transition)
      params = jax.device_put(TRANSITIONS[stage.transition](state.params, previous, stage),
                              shardings.params)
      if stage.keep_optimizer_state:
        if jax.tree.structure(shardings.opt_state) != jax.tree.structure(state.opt_state):
          raise UserError(f"stage {stage.name!r}: keep_optimizer_state needs the same "
                          "optimizer and parameter shapes as the previous stage")
        opt_state = state.opt_state
      else:
        opt_state = jax.jit(stage.make_optimizer().init, out_shardings=shardings.opt_state)(params)
      state = TrainState(state.step, params, opt_state)
    if stage.restore_from is not None:
      state, _ = restore_into(stage.restore_from, state, stage.make_optimizer(), self.model_dir)
    return state

  def save(self, state: TrainState, index: int, step: int, force: bool = False) -> None:
    """`step` is the host's own counter: reading state.step would wait for the device."""
    if step == self.last_saved_step or not (force or self.checkpointer.should_save(step)):
      return
    if not bool(all_finite(state.params)):
      raise TrainingDiverged(f"params are not finite at step {step}; refusing to save a "
                             "checkpoint (the previous one is intact)")
    self.checkpointer.save(step, state, force=force, meta={
        "step": step, "stage_index": index, "stage_name": self.stages[index].name,
        "seed": self.seed, "data": {"stage_step": step - self.starts[index]},
        "skipped_steps": self.skipped_steps, "gin_config": gin.operative_config_str()})
    self.last_saved_step = step

  def track_nonfinite(self, metrics: dict, step: int) -> None:
    """Count skipped (non-finite) steps; stop after too many in a row."""
    if not float(metrics["train/nonfinite"]):
      self.nonfinite_streak = 0
      return
    self.skipped_steps += 1
    self.nonfinite_streak += 1
    log.warning("step %d: non-finite loss or gradients; update skipped (%d skipped so far)",
                step, self.skipped_steps)
    limit = self.trainer.max_consecutive_nonfinite
    if limit and self.nonfinite_streak >= limit:
      raise TrainingDiverged(
          f"stopping: {self.nonfinite_streak} consecutive steps (up to step {step}) had a "
          "non-finite loss or gradients; lower the learning rate or check the data; the last "
          "checkpoint is intact")

  def train_stage(self, state: TrainState, index: int, guard: PreemptionGuard) -> TrainState:
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
    datasets = build_datasets(data_cfg, shard_index=jax.process_index(),
                              shard_count=jax.process_count())
    self.tokenizer = datasets.tokenizer
    if self.tokenizer.vocab_size > cfg.vocab_size:
      raise UserError(f"the tokenizer has {self.tokenizer.vocab_size} ids but "
                      f"ModelConfig.vocab_size={cfg.vocab_size}; raise vocab_size")
    byte_lengths = self.tokenizer.byte_lengths()
    proportions = datasets.train.realised_proportions(stage.num_steps)
    self.writer.write(int(state.step), {f"data/proportion/{k}": v for k, v in proportions.items()})
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
    pending, previous, clock, clock_step = [], None, None, step
    while step < end:
      local_batch = datasets.train.batch_at(step - start)  # This host's rows only.
      state, metrics = train_step(state, parallel.global_batch(local_batch, self.batch_sharding))
      step += 1
      if previous is not None:  # One step behind, so the check never stalls the device.
        self.track_nonfinite(previous, step - 1)
      pending.append(metrics)
      previous = metrics
      progress.advance(step)
      if clock is None:  # Start the clock after the first step so compilation is not counted.
        jax.block_until_ready(metrics)
        clock, clock_step = time.perf_counter(), step
      if step == end:
        self.track_nonfinite(previous, step)
      if step % trainer.log_every == 0 or step == end:
        host = jax.device_get(pending)
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        scalars["train/learning_rate"] = float(schedule(step - start - 1))
        scalars["train/skipped_steps"] = self.skipped_steps
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
        results = self.evaluate(eval_step, state.params, datasets.eval, byte_lengths)
        self.writer.write(step, results)
        progress.message(f"step {step}: eval loss {results['eval/loss']:.4f}, "
                         f"{results['eval/bits_per_byte']:.4f} bits/byte")
        self.final_metrics.update(results)
        clock, clock_step = time.perf_counter(), step
      self.save(state, index, step, force=step == end)
      # Multi-process runs agree on stopping at log steps only (it costs a collective).
      if (jax.process_count() == 1 or step % trainer.log_every == 0) and guard.requested():
        self.save(state, index, step, force=True)
        self.checkpointer.wait()
        progress.message(f"preempted: checkpoint saved at step {step}; run the same command "
                         "to resume")
        self.preempted = True
        break
    progress.close()
    return state

  def sample(self, state: TrainState, stage: Stage) -> str:
    tokenizer = self.tokenizer
    prompt = [tokenizer.bos_id, *tokenizer.encode(self.trainer.sample_prompt)]
    ids = evaluate.generate(state.params, stage.model, prompt, self.trainer.sample_tokens,
                            jax.random.key(self.seed + 1), self.trainer.sample_temperature)
    return self.trainer.sample_prompt + tokenizer.decode(ids)


@gin.configurable
def run(model_dir: str = gin.REQUIRED, stages: Sequence[Stage] = gin.REQUIRED, seed: int = 0,
        trainer: TrainerConfig | None = None,
        mesh: parallel.MeshConfig | None = None) -> dict[str, float]:
  """Train `stages` in order into model_dir, resuming from its newest intact checkpoint.
  Returns the last logged metrics, plus "preempted": 1.0 if a signal stopped the run."""
  if not stages:
    raise UserError("run.stages is empty; give at least one Stage")
  prepare_model_dir(model_dir, max(tree_bytes(abstract_state(s)) for s in stages))
  ctx = _Run(model_dir, stages, seed, trainer or TrainerConfig(), mesh or parallel.MeshConfig())
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin.config_str())
  # The mesh and rules are active while steps trace, so the model's logical constraints apply.
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules), PreemptionGuard() as guard:
    try:
      state, index = ctx.restore_or_init()
      for i in range(index, len(ctx.stages)):
        if i > index:
          state = ctx.start_stage(state, i)
        state = ctx.train_stage(state, i, guard)
        if ctx.preempted:
          break
    finally:
      ctx.checkpointer.close()
      if ctx.writer:
        ctx.writer.close()
    if ctx.trainer.sample_tokens > 0 and not ctx.preempted and ctx.tokenizer is not None:
      log.info("sample:\n%s", ctx.sample(state, ctx.stages[-1]))
  return {"step": int(state.step), "preempted": float(ctx.preempted), **ctx.final_metrics}
