"""`xla_blocked` attention (causal query blocks in plain XLA, what 'auto' runs on CPU) against the
dense XLA reference, and the rotary tables that replaced in-step sin/cos."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.model.attention import (causal_block_size, dot_product_attention,
                                   xla_attention, xla_blocked_attention)
from jaxlm.model.layers import apply_rope, rope_tables


def _inputs(seed, batch, length, heads, kv_heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], (batch, length, heads, head_dim), dtype)
  # Row 0: documents that start mid-block, then padding (id 0); the other rows: one document.
  segments = np.ones((batch, length), np.int32)
  segments[0, 7:] = 2
  segments[0, length // 2 + 5:] = 3
  segments[0, length - length // 8:] = 0
  return q, k, v, jnp.asarray(segments), do


def _value_and_grads(fn, q, k, v, do):
  def value_and_grads(q, k, v, do):
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(do))
  return jax.jit(value_and_grads)(q, k, v, do)  # One compile, not op by op.


# (length, heads, kv_heads, head_dim, block): block edges on and off the length (last block
# ragged), a single block, GQA groups of 1, 2 and 4.
CASES = [(64, 2, 2, 16, 16), (100, 4, 2, 16, 32), (96, 4, 1, 8, None), (40, 2, 1, 16, 64),
         (128, 8, 2, 32, 24)]


@pytest.mark.parametrize("length, heads, kv_heads, head_dim, block", CASES)
def test_blocked_equals_dense_forward_and_backward(length, heads, kv_heads, head_dim, block):
  q, k, v, segments, do = _inputs(0, 2, length, heads, kv_heads, head_dim)
  want = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments), q, k, v, do)
  got = _value_and_grads(
      lambda q, k, v: xla_blocked_attention(q, k, v, segments, block=block), q, k, v, do)
  # Same softmax over the same keys per row; only the summation order of float32 reductions
  # differs (observed <= 4e-6 on unit-normal inputs), far below any masking error (~1e-1).
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)


def test_blocked_bfloat16_matches_dense_bfloat16():
  q, k, v, segments, do = _inputs(1, 2, 96, 4, 2, 16, jnp.bfloat16)
  want = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments), q, k, v, do)
  got = _value_and_grads(
      lambda q, k, v: xla_blocked_attention(q, k, v, segments, block=32), q, k, v, do)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    # Both round the probabilities to bfloat16 (8 bits); 2 bf16 ulps at unit scale.
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=2 ** -6, rtol=2 ** -7)


def test_non_causal_is_the_dense_reference():
  q, k, v, segments, _ = _inputs(2, 2, 48, 2, 2, 16)
  np.testing.assert_array_equal(xla_blocked_attention(q, k, v, segments, causal=False),
                                xla_attention(q, k, v, segments, causal=False))


def test_block_size_rule():
  assert [causal_block_size(n) for n in (1, 64, 256, 512, 2048)] == [64, 64, 64, 128, 512]


def test_auto_runs_blocked_on_cpu_through_the_model():
  q, k, v, segments, _ = _inputs(3, 2, 64, 2, 2, 16)
  np.testing.assert_array_equal(dot_product_attention(q, k, v, segments, impl="auto"),
                                xla_blocked_attention(q, k, v, segments))
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=64, max_seq_len=256)
  assert cfg.attention_impl == "auto"
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 64)
  run = jax.jit(forward, static_argnums=1)  # One compile each, not op by op.
  dense = run(params, dataclasses.replace(cfg, attention_impl="xla"), tokens)
  np.testing.assert_allclose(run(params, cfg, tokens), dense, atol=2e-5, rtol=1e-5)


def test_rope_tables_equal_in_step_sin_and_cos():
  """The constant tables hold what the step used to compute: float32 angles, then sin/cos."""
  head_dim, theta = 16, 10_000.0
  sin, cos = rope_tables(300, head_dim, theta)
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(300, dtype=jnp.float32)[:, None] * inv_freq
  # numpy's and XLA's float32 sin/cos differ by a few ulps of the angle (up to ~300 rad here).
  np.testing.assert_allclose(sin, jnp.sin(angles), atol=2e-5)
  np.testing.assert_allclose(cos, jnp.cos(angles), atol=2e-5)
  # Rotation keeps norms, and position 0 is the identity.
  x = jax.random.normal(jax.random.key(0), (1, 300, 2, head_dim))
  positions = jnp.arange(300)[None]
  rotated = apply_rope(x, positions, theta, max_len=300)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  np.testing.assert_array_equal(rotated[:, 0], x[:, 0])
