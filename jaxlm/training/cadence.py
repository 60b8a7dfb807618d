"""What the training loop does every so many steps, besides stepping: average and log the
train metrics with the step time and MFU, and watch for skipped (non-finite) steps."""

import logging
import time

import jax
import numpy as np

from jaxlm.errors import TrainingDiverged

log = logging.getLogger("jaxlm")


def nonfinite_cause(metrics: dict) -> str:
  """Which part of a skipped step was not finite, from its (host) metrics."""
  if not np.isfinite(float(metrics["train/loss"])):
    return "non-finite loss"
  if not np.isfinite(float(metrics["train/grad_norm"])):
    return "non-finite gradients"
  return "the optimizer update overflowed (loss and gradients were finite)"


class NonfiniteTracker:
  """Counts skipped steps (all of the run: the count is checkpointed) and stops the run after
  `limit` in a row (0: never). Steps are checked one behind, so the check never stalls the
  device."""

  def __init__(self, limit: int, skipped: int = 0):
    self.limit, self.skipped = limit, skipped
    self.streak, self.causes, self.pending = 0, set(), None

  def step_done(self, metrics: dict, step: int, last_checkpoint) -> None:
    """Checks the step before `step`, then keeps this one's metrics for the next call."""
    self.flush(last_checkpoint)
    self.pending = (metrics, step)

  def flush(self, last_checkpoint) -> None:
    """Checks the kept step (at the end of a stage). `last_checkpoint()` says what is saved."""
    if self.pending is None:
      return
    (metrics, step), self.pending = self.pending, None
    if not float(metrics["train/nonfinite"]):
      self.streak, self.causes = 0, set()
      return
    cause = nonfinite_cause(metrics)
    self.skipped += 1
    self.streak += 1
    self.causes.add(cause)
    log.warning("step %d: %s; update skipped (%d skipped so far)", step, cause, self.skipped)
    if self.limit and self.streak >= self.limit:
      raise TrainingDiverged(
          f"stopping: {self.streak} consecutive steps (up to step {step}) were skipped "
          f"({'; '.join(sorted(self.causes))}); lower the learning rate or check the data; "
          f"{last_checkpoint()}")


class StepLog:
  """Collects each step's metrics (device arrays, never synced per step) and turns them into
  one record per log step: means, the last learning rate, and the step time, tokens/s and MFU
  since the last record (compilation and evaluation not counted)."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops_total: float):
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.peak_flops_total = peak_flops_total
    self.pending, self.clock, self.clock_step = [], None, None

  def add(self, metrics: dict, step: int) -> None:
    self.pending.append(metrics)
    if self.clock is None:  # Start the clock after the first step so compilation is not counted.
      jax.block_until_ready(metrics)
      self.restart_clock(step)

  def restart_clock(self, step: int) -> None:
    self.clock, self.clock_step = time.perf_counter(), step

  def record(self, step: int) -> dict[str, float]:
    host = jax.device_get(self.pending)
    scalars = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}  # float64
    scalars["train/learning_rate"] = float(host[-1]["train/learning_rate"])  # The last step's.
    if step > self.clock_step:
      step_time = (time.perf_counter() - self.clock) / (step - self.clock_step)
      scalars.update({"perf/step_time_sec": step_time,
                      "perf/tokens_per_sec": self.tokens_per_step / step_time,
                      "perf/mfu": self.flops_per_step / step_time / self.peak_flops_total})
    self.pending = []
    self.restart_clock(step)
    return scalars
