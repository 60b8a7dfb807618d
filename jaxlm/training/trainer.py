"""The training loop: `run` trains a list of stages (stages.py) on a device mesh (parallel.py),
resuming from the newest intact checkpoint in model_dir, and stops cleanly on SIGTERM/SIGINT
(preemption.py).

Each stage is set up (stage_setup.py: first state, data, jitted steps, eval sets), then trained
by the short loop in `Trainer.train_stage`; what happens every so many steps (log, evaluate,
checkpoint, stop on request) is in `Trainer.after_step` and cadence.py.
"""

import dataclasses
import logging
import os
import time
from typing import Sequence

import flax.linen as nn
import gin
import jax
from jax.experimental import multihost_utils

from jaxlm import parallel
from jaxlm.evaluation import decoding
from jaxlm.model import flops
from jaxlm.config import gin_usage
from jaxlm.training import preflight
from jaxlm.training import run_plan
from jaxlm.training.cadence import NonfiniteTracker, StepLog
from jaxlm.checkpointing.checkpoint import Checkpointer, DataPosition, RunRecord
from jaxlm.errors import TrainingDiverged, UserError
from jaxlm.evaluation.schedule import EvalConfig, forgetting
from jaxlm.training.ledger import ComputeLedger
from jaxlm.training.memory import describe_memory, memory_accounting
from jaxlm.training.metrics import PROGRESS_MODES, MetricsWriter, Progress
from jaxlm.training.preemption import PreemptionGuard
from jaxlm.training.stage_setup import StageSetup, build_stage, describe, first_state
from jaxlm.training.stages import Stage, stage_starts
from jaxlm.training.train_step import (TrainState, all_finite, sharded_abstract_state,
                                       state_shardings)
from jaxlm.validation import check_choice, check_field_types, check_range

log = logging.getLogger("jaxlm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  log_every: int = 10
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
    for name in ("log_every", "microbatches"):
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


class Trainer:
  """The per-run context shared by all stages: mesh, writers, checkpointer, counters that the
  checkpoint record keeps (skipped steps, data position, compute ledger, eval baseline)."""

  def __init__(self, model_dir: str, stages: Sequence[Stage], seed: int, trainer: TrainerConfig,
               mesh_config: parallel.MeshConfig, evaluation: EvalConfig):
    self.model_dir, self.stages, self.seed, self.config = model_dir, list(stages), seed, trainer
    self.evaluation = evaluation
    self.mesh = parallel.make_mesh(mesh_config)
    self.rules = mesh_config.resolved_rules()
    self.rules_label = mesh_config.rules if isinstance(mesh_config.rules, str) else self.rules
    self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
    self.starts = stage_starts(self.stages)
    self.schedules = None  # The pre-flight's (Plan.schedules), set by open().
    self.total_steps = self.starts[-1] + self.stages[-1].num_steps
    self.checkpointer = None  # Opened after the pre-flight checks (it creates checkpoints/).
    self.writer = None  # Opened once the resume step is known.
    self.plan = None  # run_plan.Plan: where to resume, and the first stage's data.
    self.setup: StageSetup | None = None  # The current stage's.
    self.peak_flops = trainer.peak_flops_per_device
    self.final_metrics: dict[str, float] = {}
    self.nonfinite = NonfiniteTracker(trainer.max_consecutive_nonfinite)
    self.preempted, self.last_saved_step = False, None
    # Kept in the checkpoint record, so that a resumed run continues them.
    self.ledger = ComputeLedger()
    self.memory = {}  # The current stage's (memory_accounting), once its step is compiled.
    self.baseline: dict[str, float] = {}  # The current stage's first evaluation.
    self.rows_before: dict[str, int] = {}  # Rows of each source drawn before the stage ...
    self.rows_after: dict[str, int] = {}  # ... and by its end.

  def to_device(self, host_batch: dict) -> dict:
    """A batch every host holds whole -> one global array per field."""
    return parallel.global_batch(parallel.host_rows(host_batch), self.batch_sharding)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Every record carries the compute spent so far (total/flops, total/tokens)."""
    scalars = {**scalars, **self.ledger.metrics()}
    self.writer.write(step, scalars)
    self.final_metrics.update(scalars)

  def open(self, plan: run_plan.Plan) -> None:
    """After the pre-flight checks: the first writes to MODEL_DIR."""
    self.plan, self.schedules = plan, plan.schedules
    config = self.config
    log.info("mesh %s over %d devices (%d processes), rules %s",
             dict(self.mesh.shape), self.mesh.size, jax.process_count(), self.rules_label)
    os.makedirs(self.model_dir, exist_ok=True)
    if jax.process_index() == 0:
      write_config(self.model_dir, gin.config_str())
    self.checkpointer = Checkpointer(
        self.model_dir, every_steps=config.checkpoint_every,
        every_secs=config.checkpoint_every_secs, keep_last=config.keep_checkpoints,
        keep_every=config.keep_checkpoint_every)

  def _restore_target(self, step: int, record: RunRecord) -> TrainState:
    index = preflight.stage_index_of(record, step, self.checkpointer.directory)
    preflight.check_fit(step, index, self.checkpointer.saved_shapes(step), self.stages,
                        self.checkpointer.directory)
    stage = self.stages[index]
    return sharded_abstract_state(stage, self.mesh, self.rules)

  def restore_or_init(self) -> tuple[TrainState, int]:
    found = self.checkpointer.restore_latest(self._restore_target)
    if found is None:
      self.writer = MetricsWriter(self.model_dir, self.config.tensorboard, resume_step=0)
      return self.stage_state(None, 0), 0
    step, record, state = found
    self.nonfinite.skipped = record.skipped_steps
    self.ledger = ComputeLedger.from_record(record.ledger)
    self.baseline = record.eval_baseline
    self.writer = MetricsWriter(self.model_dir, self.config.tensorboard, resume_step=step)
    log.info("resuming from step %d (stage %d, %r)", step, record.stage_index, record.stage_name)
    return state, record.stage_index

  def stage_state(self, state: TrainState | None, index: int) -> TrainState:
    shardings = state_shardings(self.stages[index], self.mesh, self.rules)
    return first_state(self.stages, index, state, shardings, self.seed, self.model_dir,
                       self.mesh, self.rules)

  def setup_stage(self, index: int) -> StageSetup:
    """Stage `index`'s data (each source continuing where the stages before left it), jitted
    steps and eval sets."""
    stage = self.stages[index]
    if self.plan.first_stage == index:  # Built by the pre-flight checks.
      datasets, self.plan.datasets = self.plan.datasets, None
      self.rows_before = self.plan.rows_before
    else:
      self.rows_before = self.rows_after
      datasets = run_plan.build_stage_data(stage, self.rows_before, self.evaluation.domains)
    self.rows_after = {**self.rows_before, **datasets.train.rows_drawn(stage.num_steps)}
    return build_stage(index, stage, self.starts[index], datasets,
                       state_shardings(stage, self.mesh, self.rules), self.batch_sharding,
                       self.config.microbatches, self.to_device, self.schedules[index])

  def train_stage(self, state: TrainState, index: int, guard: PreemptionGuard) -> TrainState:
    """The loop: one step per batch; cadence duties after each."""
    if int(state.step) >= self.starts[index] + self.stages[index].num_steps:
      return state
    setup = self.setup = self.setup_stage(index)
    self.begin_stage(state)
    progress = Progress(self.total_steps, int(state.step), self.config.progress)
    step_log = StepLog(setup.tokens_per_step, setup.flops_per_step,
                       self.peak_flops * jax.device_count())
    step = int(state.step)
    while step < setup.end and not self.preempted:
      batch = parallel.global_batch(setup.train.batch_at(step - setup.start), self.batch_sharding)
      if not hasattr(setup.train_step, "memory_analysis"):  # Compiled once, ahead of time.
        setup.train_step = setup.train_step.lower(state, batch).compile()
        self.account_memory(state, setup.train_step, step)
      state, metrics = setup.train_step(state, batch)
      step += 1
      self.ledger.add_steps(1, setup.flops_per_step, setup.tokens_per_step)
      step_log.add(metrics, step)
      progress.advance(step)
      self.after_step(state, metrics, step, step_log, progress, guard)
    progress.close()
    return state

  def account_memory(self, state: TrainState, compiled_step, step: int) -> None:
    """The stage's memory (jaxlm/training/memory.py): logged, written to metrics.jsonl at the
    stage's first step and kept in the checkpoint records."""
    self.memory = memory_accounting(state, compiled_step, self.setup.stage.model)
    log.info(describe_memory(self.memory))
    self.write(step, self.memory)

  def begin_stage(self, state: TrainState) -> None:
    """Logs what the stage trains; evaluates the baseline before its first update."""
    setup, step = self.setup, int(state.step)
    proportions = setup.train.realised_proportions(setup.stage.num_steps)
    self.write(step, {f"data/proportion/{k}": v for k, v in proportions.items()})
    if self.peak_flops is None:
      self.peak_flops = flops.measure_peak_flops(setup.stage.model.dtype)
    log.info(describe(setup, state, self.peak_flops))
    if step == setup.start:  # Else resumed mid-stage: the checkpoint record kept the baseline.
      self.baseline = {}
    if step == setup.start and self.evaluation.baseline:
      self.baseline = setup.evaluate(state)
      self.write(step, self.baseline)
      log.info("stage %r starts at eval loss %.4f", setup.stage.name, self.baseline["eval/loss"])

  def after_step(self, state, metrics, step: int, step_log: StepLog, progress: Progress,
                 guard: PreemptionGuard) -> None:
    """Cadence duties after `step` updates: skipped-step check, log, evaluate, checkpoint, and
    stop if a signal asked to."""
    setup, config = self.setup, self.config
    stage_end = step == setup.end
    self.nonfinite.step_done(metrics, step, self._last_checkpoint)
    if stage_end:
      self.nonfinite.flush(self._last_checkpoint)
    if step % config.log_every == 0 or stage_end:
      scalars = {**step_log.record(step), "train/skipped_steps": self.nonfinite.skipped}
      self.write(step, scalars)
      progress.report(step, scalars)
    if self.evaluation.due(step - setup.start, setup.stage.num_steps):
      results = setup.evaluate(state, final=stage_end)
      if setup.index > 0 or setup.stage.restore_from is not None:  # Else nothing came before.
        results.update(forgetting(results, self.baseline))
      self.write(step, results)
      progress.message(f"step {step}: eval loss {results['eval/loss']:.4f}, "
                       f"{results['eval/bits_per_byte']:.4f} bits/byte")
      step_log.restart_clock(step)
    self.save(state, step, force=stage_end)
    # Multi-process runs agree on stopping at log steps only (it costs a collective).
    if (jax.process_count() == 1 or step % config.log_every == 0) and guard.requested():
      self.save(state, step, force=True)
      self.checkpointer.wait()
      progress.message(f"preempted: checkpoint saved at step {step}; run the same command "
                       "to resume")
      self.preempted = True

  def save(self, state: TrainState, step: int, force: bool = False) -> None:
    """`step` is the host's own counter: reading state.step would wait for the device."""
    if step == self.last_saved_step or not (force or self.checkpointer.should_save(step)):
      return
    if not bool(all_finite(state.params)):
      raise TrainingDiverged(f"params are not finite at step {step}; refusing to save a "
                             f"checkpoint ({self._last_checkpoint()})")
    setup = self.setup
    self.checkpointer.save(step, state, force=force, record=RunRecord(
        step=step, stage_index=setup.index, stage_name=setup.stage.name, seed=self.seed,
        learning_rate=float(self.schedules[setup.index](step - setup.start)),
        data=DataPosition(step - setup.start, setup.stage.num_steps, self.rows_before,
                          self.rows_after),
        skipped_steps=self.nonfinite.skipped, ledger=self.ledger.record(), memory=self.memory,
        eval_baseline=self.baseline, gin_config=gin.operative_config_str()))
    self.last_saved_step = step

  def _last_checkpoint(self) -> str:
    latest = self.checkpointer.latest_step()
    return ("no checkpoint was saved before it" if latest is None else
            f"the last checkpoint, step {latest}, is intact")

  def sample(self, state: TrainState) -> str:
    tokenizer, config, model = self.setup.tokenizer, self.config, self.setup.stage.model
    prompt = [tokenizer.bos_id, *tokenizer.encode(config.sample_prompt)]
    prompt = prompt[-(model.max_seq_len - 1):]  # Room for at least one new token.
    result = decoding.generate_tokens(
        self.setup.params_for_eval(state), model, [prompt],
        min(config.sample_tokens, model.max_seq_len - len(prompt)), jax.random.key(self.seed + 1),
        decoding.Sampling(temperature=config.sample_temperature), eos_id=tokenizer.eos_id,
        pad_id=getattr(tokenizer, "pad_id", 0))
    return config.sample_prompt + tokenizer.decode(result.tokens[0])


@gin.configurable
def run(model_dir: str = gin.REQUIRED, stages: Sequence[Stage] = gin.REQUIRED, seed: int = 0,
        trainer: TrainerConfig | None = None, mesh: parallel.MeshConfig | None = None,
        evaluation: EvalConfig | None = None, dry_run: bool = False) -> dict[str, float]:
  """Train `stages` in order into model_dir, resuming from its newest intact checkpoint.
  Returns the last logged metrics, plus "preempted": 1.0 if a signal stopped the run.
  `dry_run`: run every pre-flight check (and the unused-binding check), write nothing."""
  if not isinstance(model_dir, str) or not model_dir:
    raise UserError(f"run.model_dir (MODEL_DIR) must be a non-empty path string, got "
                    f"{model_dir!r}; e.g. --gin.MODEL_DIR=\"'/tmp/run'\"")
  if not stages:
    raise UserError("run.stages is empty; give at least one Stage")
  for stage in stages:
    if not isinstance(stage, Stage):
      raise UserError(f"run.stages holds {stage!r}, which is not a Stage; write "
                      "run.stages = [@Stage()] (or scoped stages such as @pretrain/Stage())")
  ctx = Trainer(model_dir, stages, seed, trainer or TrainerConfig(),
                mesh or parallel.MeshConfig(), evaluation or EvalConfig())
  # The mesh and rules are active while steps trace, so the model's logical constraints apply.
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules), PreemptionGuard() as guard:
    # Every check runs before the first write to MODEL_DIR, on every process: none writes (and
    # so changes what another one is still reading) before all have passed.
    plan = run_plan.plan_run(model_dir, ctx.stages, ctx.config.microbatches, ctx.mesh,
                               ctx.rules, ctx.evaluation.domains)
    gin_usage.check_used()  # Everything gin builds for the run has been built by now.
    if dry_run:
      log.info("dry run: every check passed; nothing was written to %s", model_dir)
      return {"step": 0, "preempted": 0.0}
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxlm_preflight_done")
    ctx.open(plan)
    try:
      state, index = ctx.restore_or_init()
      for i in range(index, len(ctx.stages)):
        if i > index:
          state = ctx.stage_state(state, i)
        state = ctx.train_stage(state, i, guard)
        if ctx.preempted:
          break
    finally:
      ctx.checkpointer.close()
      if ctx.writer:
        ctx.writer.close()
    if ctx.config.sample_tokens > 0 and not ctx.preempted and ctx.setup is not None:
      log.info("sample:\n%s", ctx.sample(state))
  return {"step": int(state.step), "preempted": float(ctx.preempted), **ctx.final_metrics}
