"""The hand-written gradients behind the CPU speed-ups equal autodiff of the plain code: the
fused output head + cross-entropy (model/cross_entropy.py) and the SwiGLU activation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.model.cross_entropy import head_cross_entropy
from jaxlm.model.layers import swiglu

N, D, V = 96, 16, 50
KEYS = jax.random.split(jax.random.key(1), 5)
X = jax.random.normal(KEYS[0], (N, D))
W = jax.random.normal(KEYS[1], (D, V)) * 0.3
TARGETS = jax.random.randint(KEYS[2], (N,), 0, V)
WEIGHTS = (jax.random.uniform(KEYS[3], (N,)) > 0.3).astype(jnp.float32)  # Some tokens masked.


def _reference(x, w):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, TARGETS)


# 2**25: one chunk; 256 elements: chunks of 5 tokens (24 of them), the strided split exercised.
@pytest.mark.parametrize("chunk_elements", [2**25, 256])
@pytest.mark.parametrize("cotangent", ["weights", "scaled_weights", "arbitrary", "zero"])
def test_head_cross_entropy_equals_autodiff_for_any_cotangent(chunk_elements, cotangent):
  fused = lambda x, w: head_cross_entropy(x, w, TARGETS, WEIGHTS, jnp.float32, chunk_elements)
  # float32 sums in another order: ~1e-6 relative; a wrong softmax or a missed chunk is O(1).
  np.testing.assert_allclose(fused(X, W), _reference(X, W), rtol=1e-5)
  g = {"weights": WEIGHTS, "scaled_weights": 3 * WEIGHTS, "zero": jnp.zeros(N),
       "arbitrary": jax.random.normal(KEYS[4], (N,))}[cotangent]
  # "arbitrary" takes the recomputing branch; the others reuse the forward pass's gradient.
  got = jax.jit(lambda x, w: jax.vjp(fused, x, w)[1](g))(X, W)
  want = jax.vjp(_reference, X, W)[1](g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_head_cross_entropy_in_bfloat16_stays_close_to_float32():
  fused = head_cross_entropy(X, W, TARGETS, WEIGHTS, jnp.bfloat16)
  # bfloat16 inputs (8 mantissa bits) into float32 accumulation: logits off by ~1e-2 here.
  np.testing.assert_allclose(fused, _reference(X, W), atol=5e-2)
  assert fused.dtype == jnp.float32


def test_swiglu_gradient_equals_autodiff():
  gate_up = jax.random.normal(KEYS[0], (3, 5, 2, 7)) * 3
  plain = lambda a: nn.silu(a[..., 0, :]) * a[..., 1, :]
  np.testing.assert_allclose(swiglu(gate_up), plain(gate_up), rtol=1e-6)
  dh = jax.random.normal(KEYS[1], (3, 5, 7))
  np.testing.assert_allclose(jax.vjp(swiglu, gate_up)[1](dh)[0], jax.vjp(plain, gate_up)[1](dh)[0],
                             rtol=1e-5, atol=1e-6)
