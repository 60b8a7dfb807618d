"""FLOP formula against a hand count; schedules and the optimizer's weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import flops
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, count_params, init_params
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.schedules import warmup_constant, warmup_cosine


def test_flops_per_token_matches_a_hand_count():
  cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=128)
  # Per layer: q 64x64, o 64x64, k 64x32, v 64x32 = 12288; gate/up/down 3x64x128 = 24576.
  # Two layers (73728) plus the head 64x256 (16384) = 90112 matmul weights.
  assert flops.matmul_params(cfg) == 90112
  # The matmul weights are every parameter except the input embedding and the norm gains.
  params = init_params(cfg, jax.random.key(0))
  assert flops.matmul_params(cfg) == count_params(params) - 256 * 64 - (2 * 2 + 1) * 64
  # 6N + 12 * layers * heads * head_dim * seq = 540672 + 12*2*4*16*128.
  assert flops.flops_per_token(cfg, seq_len=128) == 540672 + 196608


def test_measured_peak_is_a_positive_rate():
  assert flops.measure_peak_flops("float32", size=256, repeats=2) > 1e6


def test_warmup_cosine_shape():
  schedule = warmup_cosine(100, peak_lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert all(np.diff([float(schedule(s)) for s in range(10, 101)]) <= 1e-7)


def test_warmup_constant_shape():
  schedule = warmup_constant(100, peak_lr=2.0, warmup_steps=4)
  assert [float(schedule(s)) for s in (0, 2, 4, 50)] == pytest.approx([0.0, 1.0, 2.0, 2.0])


def test_bad_schedule_settings_are_clear_errors():
  with pytest.raises(UserError, match="warmup_steps"):
    warmup_cosine(10, warmup_steps=20)
  with pytest.raises(UserError, match=r"warmup_cosine.peak_lr must be a number in \(0, inf\)"):
    warmup_cosine(10, peak_lr=0.0, warmup_steps=1)


def test_adamw_does_not_decay_norm_gains():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx = adamw(lambda step: 0.1, weight_decay=0.5)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], np.zeros(2))
