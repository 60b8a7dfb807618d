"""Learning-rate schedules. Each is a gin-configurable factory
`f(num_steps, previous_lr=0.0) -> optax.Schedule`, a pure function of the step within the stage,
so every stage sizes its schedule to its own length:

  warmup_cosine         warmup, cosine decay to a fraction of the peak
  warmup_constant       warmup, constant
  warmup_stable_decay   warmup, constant, then a short decay: linear, cosine, 1-sqrt or
                        exponential (MiniCPM, arXiv:2404.06395; Hägele et al. 2405.18392)
  infinite              warmup, cooldown to a constant, constant, anneal at the very end
                        (Ibrahim et al., arXiv:2403.08763 §7)

Continual pretraining re-warms a stage (Ibrahim et al.): its warmup starts from zero, or with
`warmup_from = "previous"` from the learning rate the previous stage ended at (`previous_lr`,
which the trainer passes: see `stages.stage_schedules`). Phase lengths are whole steps in
`*_steps` fields and shares of the stage in `*_fraction` fields, never one field read both ways
(so 1 is one step, and a fraction of 1 is the whole stage).
"""

import math

import gin
import jax.numpy as jnp
import optax

from jaxlm.errors import UserError
from jaxlm.validation import check_range

WARMUP_FROM = ("zero", "previous")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")


def _check(name: str, num_steps: int, warmup_steps: int, peak_lr: float) -> None:
  check_range(f"{name}.peak_lr", peak_lr, low=0, low_open=True)
  check_range(f"{name}.warmup_steps", warmup_steps, low=0, integer=True)
  if warmup_steps > num_steps:
    raise UserError(f"{name}.warmup_steps={warmup_steps} must be at most the stage's "
                    f"num_steps={num_steps}")


def _start(name: str, warmup_from: str, previous_lr: float) -> float:
  if warmup_from not in WARMUP_FROM:
    raise UserError(f"{name}.warmup_from={warmup_from!r}; choose one of {list(WARMUP_FROM)}")
  check_range(f"{name} previous_lr", previous_lr, low=0)
  return float(previous_lr) if warmup_from == "previous" else 0.0


def _warmup(count, start: float, peak: float, steps: int):
  """start -> peak linearly over `steps` (the value at count = steps is the peak)."""
  progress = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0) if steps else 1.0
  return start + (peak - start) * progress


def decay_curve(shape: str, progress, start: float, end: float):
  """From `start` (progress 0) to `end` (progress 1) along `shape`."""
  p = jnp.clip(progress, 0.0, 1.0)
  if shape == "exponential":  # Geometric: the same factor every step.
    return start * (end / start) ** p
  fraction = {"linear": lambda: 1.0 - p, "cosine": lambda: 0.5 * (1.0 + jnp.cos(math.pi * p)),
              "1-sqrt": lambda: 1.0 - jnp.sqrt(p)}[shape]()
  return end + (start - end) * fraction


def _check_shape(name: str, shape: str, end: float) -> None:
  if shape not in DECAY_SHAPES:
    raise UserError(f"{name} shape {shape!r}; choose one of {list(DECAY_SHAPES)}")
  if shape == "exponential" and end <= 0:
    raise UserError(f"{name}: an exponential decay needs final_lr_fraction > 0 (it multiplies "
                    "by the same factor every step and never reaches 0)")


def _phase_steps(name: str, field: str, num_steps: int, steps, fraction, default_fraction):
  """A phase length from `{field}_steps` or `{field}_fraction` (at most one may be set)."""
  if steps is not None and fraction is not None:
    raise UserError(f"{name}: set {field}_steps or {field}_fraction, not both")
  if steps is not None:
    check_range(f"{name}.{field}_steps", steps, low=0, integer=True)
    return int(steps)
  fraction = default_fraction if fraction is None else fraction
  check_range(f"{name}.{field}_fraction", fraction, low=0, high=1)
  return int(round(fraction * num_steps))


@gin.configurable
def warmup_cosine(num_steps: int, peak_lr: float = 3e-3, warmup_steps: int | None = None,
                  final_lr_fraction: float = 0.1, warmup_from: str = "zero",
                  previous_lr: float = 0.0,
                  warmup_fraction: float | None = None) -> optax.Schedule:
  """Linear warmup to peak_lr, then cosine decay to final_lr_fraction * peak_lr at the stage's
  end. With warmup_from="previous": re-warm + re-decay (Ibrahim et al., arXiv:2403.08763).
  The warmup is `warmup_steps` steps or a `warmup_fraction` of the stage (100 steps if
  neither is set)."""
  if warmup_steps is None and warmup_fraction is None:
    warmup_steps = 100
  warmup_steps = _phase_steps("warmup_cosine", "warmup", num_steps, warmup_steps,
                              warmup_fraction, None)
  _check("warmup_cosine", num_steps, warmup_steps, peak_lr)
  check_range("warmup_cosine.final_lr_fraction", final_lr_fraction, low=0, high=1)
  return optax.warmup_cosine_decay_schedule(
      init_value=_start("warmup_cosine", warmup_from, previous_lr), peak_value=peak_lr,
      warmup_steps=warmup_steps, decay_steps=max(num_steps, warmup_steps + 1),
      end_value=peak_lr * final_lr_fraction)


@gin.configurable
def warmup_constant(num_steps: int, peak_lr: float = 3e-3, warmup_steps: int = 0,
                    warmup_from: str = "zero", previous_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup, then constant."""
  _check("warmup_constant", num_steps, warmup_steps, peak_lr)
  start = _start("warmup_constant", warmup_from, previous_lr)
  return lambda count: _warmup(count, start, peak_lr, warmup_steps)


@gin.configurable
def warmup_stable_decay(num_steps: int, peak_lr: float = 3e-3, warmup_steps: int = 100,
                        decay_steps: int | None = None, decay_fraction: float | None = None,
                        decay_shape: str = "linear", final_lr_fraction: float = 0.0,
                        warmup_from: str = "zero", previous_lr: float = 0.0) -> optax.Schedule:
  """Warmup-stable-decay (MiniCPM, arXiv:2404.06395): linear warmup to peak_lr, constant, then
  the last decay_steps (or decay_fraction of the stage; default 0.1, MiniCPM's ~10%) decay to
  final_lr_fraction * peak_lr, reached at the stage's end. A decay branched from a stable-phase
  checkpoint of another run is a stage with warmup_steps = 0 and decay_fraction = 1."""
  name = "warmup_stable_decay"
  _check(name, num_steps, warmup_steps, peak_lr)
  check_range(f"{name}.final_lr_fraction", final_lr_fraction, low=0, high=1)
  _check_shape(f"{name}.decay_shape", decay_shape, final_lr_fraction)
  decay = _phase_steps(name, "decay", num_steps, decay_steps, decay_fraction, 0.1)
  if warmup_steps + decay > num_steps:
    raise UserError(f"{name}: warmup_steps={warmup_steps} + decay ({decay} steps) exceed the "
                    f"stage's num_steps={num_steps}")
  start, end, decay_start = _start(name, warmup_from, previous_lr), peak_lr * final_lr_fraction, \
      num_steps - decay

  def schedule(count):
    warm = _warmup(count, start, peak_lr, warmup_steps)
    decayed = decay_curve(decay_shape, (count - decay_start) / max(decay, 1), peak_lr, end)
    return jnp.where(count < warmup_steps, warm, jnp.where(count < decay_start, peak_lr, decayed))
  return schedule


@gin.configurable
def infinite(num_steps: int, peak_lr: float = 3e-3, constant_lr_fraction: float = 0.5,
             final_lr_fraction: float = 0.1, warmup_steps: int = 100, cooldown_steps: int = 0,
             anneal_steps: int = 0, anneal_shape: str = "linear", warmup_from: str = "zero",
             previous_lr: float = 0.0) -> optax.Schedule:
  """Ibrahim et al.'s infinite schedule (arXiv:2403.08763 §7): linear warmup to peak_lr, cosine
  cooldown over cooldown_steps to constant_lr_fraction * peak_lr, constant (for as long as data
  keeps coming: later stages continue it with warmup_steps = cooldown_steps = 0 and no
  re-warming), and, only in the stage that ends training, an anneal over its last anneal_steps to
  final_lr_fraction * peak_lr (linear here; the paper leaves the shape open)."""
  name = "infinite"
  _check(name, num_steps, warmup_steps, peak_lr)
  check_range(f"{name}.constant_lr_fraction", constant_lr_fraction, low=0, high=1, low_open=True)
  check_range(f"{name}.final_lr_fraction", final_lr_fraction, low=0, high=constant_lr_fraction)
  check_range(f"{name}.cooldown_steps", cooldown_steps, low=0, integer=True)
  check_range(f"{name}.anneal_steps", anneal_steps, low=0, integer=True)
  _check_shape(f"{name}.anneal_shape", anneal_shape, final_lr_fraction)
  if warmup_steps + cooldown_steps + anneal_steps > num_steps:
    raise UserError(f"{name}: warmup_steps={warmup_steps} + cooldown_steps={cooldown_steps} + "
                    f"anneal_steps={anneal_steps} exceed the stage's num_steps={num_steps}")
  start = _start(name, warmup_from, previous_lr)
  constant, end = peak_lr * constant_lr_fraction, peak_lr * final_lr_fraction
  anneal_start = num_steps - anneal_steps

  def schedule(count):
    warm = _warmup(count, start, peak_lr, warmup_steps)
    cool = decay_curve("cosine", (count - warmup_steps) / max(cooldown_steps, 1), peak_lr,
                       constant)
    anneal = decay_curve(anneal_shape, (count - anneal_start) / max(anneal_steps, 1), constant,
                         end)
    after_warmup = jnp.where(count < warmup_steps + cooldown_steps, cool,
                             jnp.where(count < anneal_start, constant, anneal))
    return jnp.where(count < warmup_steps, warm, after_warmup)
  return schedule
