"""Learning-rate schedules. Each is a gin-configurable factory `f(num_steps) -> optax.Schedule`,
so a stage can size its schedule to its own length (re-warming in a continual stage is then just
a fresh schedule, because the optimizer's step count restarts with the stage)."""

import gin
import optax

from jaxlm.errors import UserError
from jaxlm.validation import check_range


def _check(name: str, num_steps: int, warmup_steps: int, peak_lr: float) -> None:
  check_range(f"{name}.peak_lr", peak_lr, low=0, low_open=True)
  check_range(f"{name}.warmup_steps", warmup_steps, low=0, integer=True)
  if warmup_steps > num_steps:
    raise UserError(f"{name}.warmup_steps={warmup_steps} must be at most the stage's "
                    f"num_steps={num_steps}")


@gin.configurable
def warmup_cosine(num_steps: int, peak_lr: float = 3e-3, warmup_steps: int = 100,
                  final_lr_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to peak_lr, then cosine decay to final_lr_fraction * peak_lr."""
  _check("warmup_cosine", num_steps, warmup_steps, peak_lr)
  check_range("warmup_cosine.final_lr_fraction", final_lr_fraction, low=0, high=1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1), end_value=peak_lr * final_lr_fraction)


@gin.configurable
def warmup_constant(num_steps: int, peak_lr: float = 3e-3,
                    warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup, then constant."""
  _check("warmup_constant", num_steps, warmup_steps, peak_lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1)), optax.constant_schedule(peak_lr)],
      boundaries=[warmup_steps])
