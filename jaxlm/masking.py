"""The attention mask that every implementation agrees on: which keys a query sees, and the
logit that hides the rest.

It stands apart from `jaxlm.model` and `jaxlm.kernels` because both need it (the XLA reference,
the Pallas tiles, the cuDNN mask) and neither may import the other for it: the model reaches the
kernels only through its dispatch table, and the kernels never import the model.
"""

import jax.numpy as jnp

# Large but finite: a fully masked row (padding) then gives a uniform softmax instead of NaN, and
# the flash kernels' running max never computes inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segments_BL, k_segments_BS, causal: bool, q_offset: int = 0):
  """[B, L, S] boolean mask: same document (segment id) and, if causal, not in the future.
  Queries are rows q_offset.. of the sequence and keys its first S rows (a query block)."""
  mask_BLS = q_segments_BL[:, :, None] == k_segments_BS[:, None, :]
  if causal:
    q_positions = q_offset + jnp.arange(q_segments_BL.shape[1])
    mask_BLS &= (q_positions[:, None] >= jnp.arange(k_segments_BS.shape[1])[None, :])[None]
  return mask_BLS
