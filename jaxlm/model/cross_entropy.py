"""The output head fused with cross-entropy: next-token losses without keeping [N, V] logits.

Autodiff of `logits = x @ W; log_softmax(logits)[target]` writes the float32 logits, reads them
again for the softmax, writes the softmax for the backward pass, reads it to form dlogits and
transposes it for the weight gradient: several passes over the largest tensor of a small model's
step (4096 tokens x 32k vocab = 512 MiB in float32). Here each chunk of tokens computes its
logits, loss and softmax - onehot in one pass and feeds them straight to the two gradient matmuls,
so nothing of size [N, V] outlives its chunk (the fused linear cross-entropy of Liger-Kernel,
Hsu et al. 2410.10989). On bench-small (tools/bench.py) this made the whole CPU step ~13% faster.

The weight gradient needs the per-token cotangent, which is only known in the backward pass. The
forward pass therefore accumulates it weighted by `loss_weights` (the weights the caller will sum
the losses with); the backward pass uses it when the cotangent is proportional to them, as it is
for `sum(ce * weights)`, and otherwise recomputes the logits chunk by chunk, so the gradient is
exact for any cotangent. Without differentiation (evaluation) only the losses are computed.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logits per chunk (tokens x vocab): 128 MiB of float32. Fewer, larger chunks keep the matmuls
# efficient, and each chunk costs one read-modify-write of the [D, V] weight gradient; for the
# bench-small head on a 2-core CPU, 4 chunks of 1024 x 32k ran as fast as one, 8 of 512 slower.
CHUNK_ELEMENTS = 2**25


def _num_chunks(num_tokens: int, vocab_size: int, chunk_elements: int) -> int:
  """The fewest equal chunks whose [chunk, V] logits hold at most chunk_elements."""
  count = max(1, -(-num_tokens * vocab_size // chunk_elements))
  while num_tokens % count:
    count += 1
  return count


def _split(x, count: int):
  """[N, ...] -> [count, N / count, ...], chunk k = rows k, k + count, ...: strided, so a
  batch-sharded N keeps every chunk spread over all data-parallel devices."""
  x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))


def _unsplit(x):
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _logits(x_CD, w_DV, dtype):
  return jnp.einsum("cd,dv->cv", x_CD.astype(dtype), w_DV.astype(dtype),
                    preferred_element_type=jnp.float32)


def _losses_and_lse(logits_CV, targets_C):
  lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
  target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
  return lse_C - target_logit_C, lse_C


def _dlogits(logits_CV, lse_C, targets_C):
  """d ce / d logits = softmax - onehot(target), in float32."""
  onehot_CV = jax.nn.one_hot(targets_C, logits_CV.shape[-1], dtype=jnp.float32)
  return jnp.exp(logits_CV - lse_C[:, None]) - onehot_CV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_cross_entropy(x_ND, w_DV, targets_N, loss_weights_N, dtype=jnp.float32,
                       chunk_elements: int = CHUNK_ELEMENTS):
  """Per-token cross-entropy [N] (float32) of logits x_ND @ w_DV against integer targets.

  Matmuls take their inputs in `dtype` and accumulate in float32. `loss_weights_N` does not
  change the result: it is the hint that makes the backward pass cheap (see the module doc).
  """
  del loss_weights_N
  count = _num_chunks(x_ND.shape[0], w_DV.shape[1], chunk_elements)

  def one_chunk(_, inputs):
    x_CD, targets_C = inputs
    return None, _losses_and_lse(_logits(x_CD, w_DV, dtype), targets_C)[0]

  _, ce_KC = jax.lax.scan(one_chunk, None, (_split(x_ND, count), _split(targets_N, count)))
  return _unsplit(ce_KC)


def _forward_with_gradients(x_ND, w_DV, targets_N, loss_weights_N, dtype, chunk_elements):
  count = _num_chunks(x_ND.shape[0], w_DV.shape[1], chunk_elements)

  def one_chunk(dw_weighted_DV, inputs):
    x_CD, targets_C, weights_C = inputs
    logits_CV = _logits(x_CD, w_DV, dtype)
    ce_C, lse_C = _losses_and_lse(logits_CV, targets_C)
    dlogits_CV = _dlogits(logits_CV, lse_C, targets_C)
    dx_CD = jnp.einsum("cv,dv->cd", dlogits_CV.astype(dtype), w_DV.astype(dtype),
                       preferred_element_type=jnp.float32)
    dw_weighted_DV += jnp.einsum("cd,cv->dv", x_CD.astype(dtype),
                                 (dlogits_CV * weights_C[:, None]).astype(dtype),
                                 preferred_element_type=jnp.float32)
    return dw_weighted_DV, (ce_C, lse_C, dx_CD)

  inputs = (_split(x_ND, count), _split(targets_N, count), _split(loss_weights_N, count))
  dw_weighted_DV, (ce_KC, lse_KC, dx_KCD) = jax.lax.scan(
      one_chunk, jnp.zeros(w_DV.shape, jnp.float32), inputs)
  residuals = (x_ND, w_DV, targets_N, loss_weights_N, _unsplit(lse_KC),
               _unsplit(dx_KCD), dw_weighted_DV)
  return _unsplit(ce_KC), residuals


def _recomputed_weight_gradient(x_ND, w_DV, targets_N, lse_N, g_N, dtype, chunk_elements):
  """The exact weight gradient for any cotangent g: logits recomputed chunk by chunk."""
  count = _num_chunks(x_ND.shape[0], w_DV.shape[1], chunk_elements)

  def one_chunk(dw_DV, inputs):
    x_CD, targets_C, lse_C, g_C = inputs
    dlogits_CV = _dlogits(_logits(x_CD, w_DV, dtype), lse_C, targets_C) * g_C[:, None]
    return dw_DV + jnp.einsum("cd,cv->dv", x_CD.astype(dtype), dlogits_CV.astype(dtype),
                              preferred_element_type=jnp.float32), None

  inputs = tuple(_split(a, count) for a in (x_ND, targets_N, lse_N, g_N))
  return jax.lax.scan(one_chunk, jnp.zeros(w_DV.shape, jnp.float32), inputs)[0]


def _backward(dtype, chunk_elements, residuals, g_N):
  x_ND, w_DV, targets_N, weights_N, lse_N, dx_ND, dw_weighted_DV = residuals
  g_N = g_N.astype(jnp.float32)
  # Is g = c * weights? Exactly so for sum(ce * weights) (c = 1); then the forward pass's
  # weighted gradient is the answer, else recompute.
  weight_norm = jnp.sum(weights_N * weights_N)
  scale = jnp.where(weight_norm > 0, jnp.sum(g_N * weights_N) / jnp.maximum(weight_norm, 1e-30),
                    0.0)
  tolerance = 1e-6 * jnp.max(jnp.abs(g_N))
  proportional = jnp.all(jnp.abs(g_N - scale * weights_N) <= tolerance)
  dw_DV = jax.lax.cond(
      proportional, lambda: scale * dw_weighted_DV,
      lambda: _recomputed_weight_gradient(x_ND, w_DV, targets_N, lse_N, g_N, dtype, chunk_elements))
  return (g_N[:, None] * dx_ND).astype(x_ND.dtype), dw_DV.astype(w_DV.dtype), None, None


head_cross_entropy.defvjp(_forward_with_gradients, _backward)
