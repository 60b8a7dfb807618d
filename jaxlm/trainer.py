"""The training loop: eval / checkpoint / log cadence around the jitted step (train_step.py).

`run` trains a list of stages (stages.py) on a device mesh (parallel.py), resuming from the
newest intact checkpoint in model_dir, and stops cleanly on SIGTERM/SIGINT (preemption.py).
"""

import dataclasses
import logging
import os
import time
from typing import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import evaluate, flops, parallel, preflight
from jaxlm.checkpoint import Checkpointer
from jaxlm.errors import TrainingDiverged, UserError
from jaxlm.metrics import PROGRESS_MODES, MetricsWriter, Progress
from jaxlm.model import count_params
from jaxlm.preemption import PreemptionGuard
from jaxlm.restore import restore_into
from jaxlm.stages import TRANSITIONS, Stage, stage_starts
from jaxlm.train_step import (TrainState, abstract_state, all_finite, make_eval_step,
                              make_train_step, sharded_init, state_shardings)
from jaxlm.validation import check_choice, check_field_types, check_range

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

  def __post_init__(self):
    check_field_types(self)
    for name in ("log_every", "eval_every", "microbatches"):
      check_range(f"TrainerConfig.{name}", getattr(self, name), low=1, integer=True)
    for name in ("checkpoint_every", "keep_checkpoints", "keep_checkpoint_every"):  # None: off.
      check_range(f"TrainerConfig.{name}", getattr(self, name), low=1, integer=True,
                  optional=True)
    check_range("TrainerConfig.checkpoint_every_secs", self.checkpoint_every_secs, low=0,
                low_open=True, optional=True)
    check_range("TrainerConfig.max_consecutive_nonfinite", self.max_consecutive_nonfinite, low=0,
                integer=True)
    check_choice("TrainerConfig.progress", self.progress, PROGRESS_MODES)
    check_range("TrainerConfig.peak_flops_per_device", self.peak_flops_per_device, low=0,
                low_open=True, optional=True)
    check_range("TrainerConfig.sample_tokens", self.sample_tokens, low=0, integer=True)
    check_range("TrainerConfig.sample_temperature", self.sample_temperature, low=0)


def write_config(model_dir: str, text: str) -> None:
  """MODEL_DIR/config.gin is the operative config of the latest run; a resumed run whose config
  differs keeps the previous one as config.<its modification time>.gin."""
  path = os.path.join(model_dir, "config.gin")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    kept, n = os.path.join(model_dir, f"config.{stamp}.gin"), 1
    while os.path.exists(kept):
      n += 1
      kept = os.path.join(model_dir, f"config.{stamp}-{n}.gin")
    os.replace(path, kept)
    log.info("the config differs from the one this MODEL_DIR was trained with; kept that one as "
             "%s", os.path.basename(kept))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def nonfinite_cause(metrics: dict) -> str:
  """Which part of a skipped step was not finite, from its (host) metrics."""
  if not np.isfinite(float(metrics["train/loss"])):
    return "non-finite loss"
  if not np.isfinite(float(metrics["train/grad_norm"])):
    return "non-finite gradients"
  return "the optimizer update overflowed (loss and gradients were finite)"


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
    self.checkpointer = None  # Opened after the pre-flight checks (it creates checkpoints/).
    self.writer = None  # Opened once the resume step is known.
    self.plan = None  # preflight.Plan: where to resume, and the first stage's data.
    self.tokenizer = None  # The current stage's (DataConfig.tokenizer).
    self.peak_flops = trainer.peak_flops_per_device
    self.final_metrics: dict[str, float] = {}
    self.skipped_steps, self.nonfinite_streak, self.preempted = 0, 0, False
    self.nonfinite_causes: set[str] = set()
    self.last_saved_step = None
    # Rows of each source drawn before / by the end of the current stage (checkpoint record).
    self.rows_before: dict[str, int] = {}
    self.rows_after: dict[str, int] = {}
    self.rules_label = mesh_config.rules if isinstance(mesh_config.rules, str) else self.rules

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

  def open(self, plan: preflight.Plan) -> None:
    """After the pre-flight checks: the first writes to MODEL_DIR."""
    self.plan = plan
    trainer = self.trainer
    log.info("mesh %s over %d devices (%d processes), rules %s",
             dict(self.mesh.shape), self.mesh.size, jax.process_count(), self.rules_label)
    os.makedirs(self.model_dir, exist_ok=True)
    if jax.process_index() == 0:
      write_config(self.model_dir, gin.config_str())
    self.checkpointer = Checkpointer(
        self.model_dir, every_steps=trainer.checkpoint_every,
        every_secs=trainer.checkpoint_every_secs, keep_last=trainer.keep_checkpoints,
        keep_every=trainer.keep_checkpoint_every)

  def _restore_target(self, step: int, meta: dict) -> TrainState:
    index = int(meta["stage_index"])
    preflight.check_fit(step, index, self.checkpointer.saved_shapes(step), self.stages,
                        self.checkpointer.directory)
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
      if stage.keep_optimizer_state:  # Pre-flight checked that its shapes fit this stage.
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
                             f"checkpoint ({self._last_checkpoint()})")
    self.checkpointer.save(step, state, force=force, meta={
        "step": step, "stage_index": index, "stage_name": self.stages[index].name,
        "seed": self.seed, "data": {"stage_step": step - self.starts[index],
                                    "rows_before_stage": self.rows_before,
                                    "rows_after_stage": self.rows_after},
        "skipped_steps": self.skipped_steps, "gin_config": gin.operative_config_str()})
    self.last_saved_step = step

  def _last_checkpoint(self) -> str:
    latest = self.checkpointer.latest_step()
    return ("no checkpoint was saved before it" if latest is None else
            f"the last checkpoint, step {latest}, is intact")

  def track_nonfinite(self, metrics: dict, step: int) -> None:
    """Count skipped (non-finite) steps; stop after too many in a row."""
    if not float(metrics["train/nonfinite"]):
      self.nonfinite_streak, self.nonfinite_causes = 0, set()
      return
    cause = nonfinite_cause(metrics)
    self.skipped_steps += 1
    self.nonfinite_streak += 1
    self.nonfinite_causes.add(cause)
    log.warning("step %d: %s; update skipped (%d skipped so far)", step, cause,
                self.skipped_steps)
    limit = self.trainer.max_consecutive_nonfinite
    if limit and self.nonfinite_streak >= limit:
      raise TrainingDiverged(
          f"stopping: {self.nonfinite_streak} consecutive steps (up to step {step}) were "
          f"skipped ({'; '.join(sorted(self.nonfinite_causes))}); lower the learning rate or "
          f"check the data; {self._last_checkpoint()}")

  def train_stage(self, state: TrainState, index: int, guard: PreemptionGuard) -> TrainState:
    stage, start, trainer = self.stages[index], self.starts[index], self.trainer
    end = start + stage.num_steps
    if int(state.step) >= end:
      return state
    cfg, data_cfg = stage.model, stage.data
    if self.plan.first_stage == index:  # Built by the pre-flight checks.
      datasets, self.plan.datasets = self.plan.datasets, None
      self.rows_before = self.plan.rows_before
    else:  # Each source continues where the stages before left it.
      self.rows_before = self.rows_after
      datasets = preflight.build_stage_data(stage, self.rows_before)
    self.rows_after = {**self.rows_before, **datasets.train.rows_drawn(stage.num_steps)}
    self.tokenizer = datasets.tokenizer
    byte_lengths = self.tokenizer.byte_lengths()
    proportions = datasets.train.realised_proportions(stage.num_steps)
    self.writer.write(int(state.step), {f"data/proportion/{k}": v for k, v in proportions.items()})
    shardings = state_shardings(stage, self.mesh, self.rules)
    train_step = make_train_step(stage, shardings, self.batch_sharding, trainer.microbatches,
                                 stage_start=start)
    eval_step = make_eval_step(stage, shardings.params, self.batch_sharding)
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
        scalars = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}  # float64
        scalars["train/learning_rate"] = float(host[-1]["train/learning_rate"])  # The last step's.
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
  if not isinstance(model_dir, str) or not model_dir:
    raise UserError(f"run.model_dir (MODEL_DIR) must be a non-empty path string, got "
                    f"{model_dir!r}; e.g. --gin.MODEL_DIR=\"'/tmp/run'\"")
  if not stages:
    raise UserError("run.stages is empty; give at least one Stage")
  for stage in stages:
    if not isinstance(stage, Stage):
      raise UserError(f"run.stages holds {stage!r}, which is not a Stage; write "
                      "run.stages = [@Stage()] (or scoped stages such as @pretrain/Stage())")
  ctx = _Run(model_dir, stages, seed, trainer or TrainerConfig(), mesh or parallel.MeshConfig())
  # The mesh and rules are active while steps trace, so the model's logical constraints apply.
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules), PreemptionGuard() as guard:
    # Every check runs before the first write to MODEL_DIR, on every process: none writes (and
    # so changes what another one is still reading) before all have passed.
    plan = preflight.preflight(model_dir, ctx.stages, ctx.trainer.microbatches, ctx.mesh,
                               ctx.rules)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxlm_preflight_done")
    ctx.open(plan)
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
