"""Learning-rate schedules: each hits its stated values at the stated steps, is continuous where
it should be, re-warms from where the previous stage ended, and refuses phases that do not fit."""

import math

import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.optim.schedules import (infinite, warmup_constant, warmup_cosine,
                                   warmup_stable_decay)
from jaxlm.training.stages import Stage, stage_schedules


def _values(schedule, num_steps):
  return np.array([float(schedule(t)) for t in range(num_steps + 1)])


def _max_jump(values):
  return float(np.max(np.abs(np.diff(values))))


@pytest.mark.parametrize("shape,midpoint", [
    ("linear", 0.1 + 0.9 * 0.5), ("cosine", 0.1 + 0.9 * 0.5),
    ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5))), ("exponential", math.sqrt(0.1))])
def test_warmup_stable_decay_hits_its_values(shape, midpoint):
  lr = _values(warmup_stable_decay(100, peak_lr=1.0, warmup_steps=10, decay_steps=20,
                                   decay_shape=shape, final_lr_fraction=0.1), 100)
  np.testing.assert_allclose(lr[[0, 5, 10, 50, 80]], [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(lr[90], midpoint, rtol=1e-5)
  np.testing.assert_allclose(lr[100], 0.1, rtol=1e-5)
  assert np.all(np.diff(lr[80:]) <= 1e-7)  # Decays monotonically ...
  # ... and continuously: no step moves more than warmup's slope or 1-sqrt's first decay step.
  assert _max_jump(lr) <= max(0.1, 0.9 * math.sqrt(1 / 20)) + 1e-6


def test_decay_length_is_steps_or_a_fraction_never_ambiguous():
  one_step = _values(warmup_stable_decay(10, peak_lr=1.0, warmup_steps=0, decay_steps=1), 10)
  np.testing.assert_allclose(one_step, [1.0] * 10 + [0.0], atol=1e-7)
  whole = _values(warmup_stable_decay(10, peak_lr=1.0, warmup_steps=0, decay_fraction=1), 10)
  np.testing.assert_allclose(whole, np.linspace(1.0, 0.0, 11), atol=1e-6)
  default = _values(warmup_stable_decay(100, peak_lr=1.0, warmup_steps=0), 100)
  assert default[89] == 1.0 and default[90] == 1.0 and default[91] < 1.0  # 10% by default.


def test_a_decay_branched_from_the_stable_phase_continues_the_full_schedule():
  """MiniCPM's branching: a run restored at a stable-phase step, decaying over the rest, has
  the full warmup-stable-decay run's learning rate at every later step."""
  full = _values(warmup_stable_decay(100, peak_lr=2.0, warmup_steps=10, decay_steps=30,
                                     decay_shape="1-sqrt"), 100)
  branch = _values(warmup_stable_decay(30, peak_lr=2.0, warmup_steps=0, decay_fraction=1.0,
                                       decay_shape="1-sqrt"), 30)
  np.testing.assert_allclose(branch, full[70:], atol=1e-6)


def test_infinite_schedule_phases():
  lr = _values(infinite(100, peak_lr=1.0, constant_lr_fraction=0.5, final_lr_fraction=0.1,
                        warmup_steps=10, cooldown_steps=20, anneal_steps=10), 100)
  np.testing.assert_allclose(lr[[0, 10, 20, 30, 60, 90, 95, 100]],
                             [0.0, 1.0, 0.75, 0.5, 0.5, 0.5, 0.3, 0.1], atol=1e-6)
  assert _max_jump(lr) <= 0.1 + 1e-6  # Warmup's slope is the steepest.
  # A later stage continues at the constant, with no re-warming, and may anneal at its end.
  later = _values(infinite(50, peak_lr=1.0, constant_lr_fraction=0.5, warmup_steps=0,
                           anneal_steps=0), 50)
  np.testing.assert_allclose(later, 0.5, atol=1e-7)


def test_re_warming_starts_from_where_the_previous_stage_ended():
  first = Stage(num_steps=100, schedule=lambda n, previous_lr=0.0: warmup_cosine(
      n, peak_lr=1.0, warmup_steps=10, final_lr_fraction=0.1, previous_lr=previous_lr))
  rewarm = Stage(num_steps=50, schedule=lambda n, previous_lr=0.0: warmup_cosine(
      n, peak_lr=0.5, warmup_steps=10, final_lr_fraction=0.1, warmup_from="previous",
      previous_lr=previous_lr))
  from_zero = Stage(num_steps=50, schedule=lambda n: warmup_constant(n, 0.5, warmup_steps=10))
  schedules = stage_schedules([first, rewarm])
  np.testing.assert_allclose(float(schedules[1](0)), 0.1, rtol=1e-6)  # Stage one's final LR.
  np.testing.assert_allclose(float(schedules[1](5)), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(schedules[1](10)), 0.5, rtol=1e-6)
  assert float(stage_schedules([first, from_zero])[1](0)) == 0.0


@pytest.mark.parametrize("make,message", [
    (lambda: warmup_stable_decay(100, decay_steps=10, decay_fraction=0.1),
     "set decay_steps or decay_fraction, not both"),
    (lambda: warmup_stable_decay(100, warmup_steps=50, decay_steps=60),
     r"warmup_steps=50 \+ decay \(60 steps\) exceed the stage's num_steps=100"),
    (lambda: warmup_stable_decay(100, decay_fraction=5), r"decay_fraction must be a number in \[0, 1\]"),
    (lambda: warmup_stable_decay(100, decay_steps=2.5), "decay_steps must be"),
    (lambda: warmup_stable_decay(100, decay_shape="exponential"), "needs final_lr_fraction > 0"),
    (lambda: warmup_stable_decay(100, decay_shape="step"), "choose one of"),
    (lambda: infinite(100, warmup_steps=50, cooldown_steps=40, anneal_steps=20),
     "exceed the stage's num_steps=100"),
    (lambda: warmup_cosine(100, warmup_from="last"), r"warmup_from='last'; choose one of"),
])
def test_schedule_phases_that_do_not_fit_are_one_line(make, message):
  with pytest.raises(UserError, match=message):
    make()


def test_a_warmup_is_steps_or_a_share_of_the_stage_never_both():
  assert warmup_cosine(2000, peak_lr=1.0, warmup_fraction=0.05)(100) == 1.0  # Peak at 5%.
  assert warmup_cosine(2, peak_lr=1.0, warmup_fraction=0.05)(0) == 1.0  # No warm-up step.
  assert float(warmup_cosine(200, peak_lr=1.0)(50)) == 0.5  # Neither set: 100 steps.
  with pytest.raises(UserError, match="set warmup_steps or warmup_fraction, not both"):
    warmup_cosine(100, warmup_steps=10, warmup_fraction=0.1)
