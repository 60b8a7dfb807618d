"""The arithmetic of flash attention on one (query block, key block) tile.

Both lowerings (`flash_attention_gpu`, `flash_attention_tpu`) call these functions inside their
kernels; they differ only in how tiles are fetched and where running statistics live. Names:
Q = query rows in the block, K = keys in the block, D = head dim, W = width of a per-row
statistic (1 on GPU; 128 on TPU, where statistics are replicated across the vector lanes).

Forward: the online softmax of Milakov & Gimelshein (1805.02867) as arranged by FlashAttention-2
(Dao 2023, 2307.08691, algorithm 1): keep a running row max `m`, a running denominator `l` and an
unnormalised output `acc`; rescale them when the max grows. Backward (same paper, algorithm 2):
recompute P = exp(S - logsumexp) tile by tile from the saved logsumexp instead of storing it.

Masking: masked logits are replaced by MASK_VALUE (`jaxlm.masking`, shared with the XLA
reference), a large *finite* negative number. A key block that is fully masked for a row then
contributes exp(MASK - m) = 0 once the row has seen any visible key, and the running max of a row
that has seen none stays at MASK_VALUE, so no step ever computes inf - inf: outputs and gradients
are always finite.
"""

import jax.numpy as jnp
from jax import lax

from jaxlm.masking import MASK_VALUE

_CONTRACT_LAST = (((1,), (1,)), ((), ()))   # a @ b.T
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a.T @ b
_CONTRACT_INNER = (((1,), (0,)), ((), ()))  # a @ b


def matmul_nt(a, b):
  return lax.dot_general(a, b, _CONTRACT_LAST, preferred_element_type=jnp.float32)


def matmul_tn(a, b):
  return lax.dot_general(a, b, _CONTRACT_FIRST, preferred_element_type=jnp.float32)


def matmul(a, b):
  return lax.dot_general(a, b, _CONTRACT_INNER, preferred_element_type=jnp.float32)


def widen(stat_QW, width: int):
  """A per-row statistic [Q, W] as [Q, width]: broadcast a column, tile lane-replicated rows.

  Mosaic (TPU) keeps row statistics replicated over 128 lanes and tiles them (cheap) rather
  than broadcasting a [Q, 1] column (a relayout), as splash attention does.
  """
  have = stat_QW.shape[1]
  if have == width:
    return stat_QW
  if have == 1:
    return jnp.broadcast_to(stat_QW, (stat_QW.shape[0], width))
  if width % have == 0:
    return jnp.tile(stat_QW, (1, width // have))
  return stat_QW[:, :width]


def tile_mask(q_segment_ids, kv_segment_ids, q_start, k_start, shape, *, causal: bool,
              kv_len: int | None):
  """[Q, K] bool: same document, not in the future (if causal), not length padding.

  `q_segment_ids` broadcasts to [Q, K] as a column, `kv_segment_ids` as a row. `kv_len` is the
  true key length when the kernel padded the sequence (None: no padding, no position test).
  """
  mask_QK = q_segment_ids == kv_segment_ids
  if causal or kv_len is not None:
    k_pos_QK = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  if causal:
    q_pos_QK = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    mask_QK = mask_QK & (q_pos_QK >= k_pos_QK)
  if kv_len is not None:
    mask_QK = mask_QK & (k_pos_QK < kv_len)
  return mask_QK


def masked_logits(q_QD, k_KD, mask_QK, scale: float):
  """Scaled logits in float32, masked entries set to MASK_VALUE."""
  return jnp.where(mask_QK, matmul_nt(q_QD, k_KD) * scale, MASK_VALUE)


def initial_stats(rows: int, width: int, head_dim: int):
  """(m, l, acc) before any key block: max at MASK_VALUE, empty sums."""
  return (jnp.full((rows, width), MASK_VALUE, jnp.float32), jnp.zeros((rows, width), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))


def online_softmax_step(s_QK, v_KD, m_QW, l_QW, acc_QD):
  """Fold one key block into the running (max, denominator, unnormalised output)."""
  m_next_QW = jnp.maximum(m_QW, jnp.max(s_QK, axis=1, keepdims=True))
  p_QK = jnp.exp(s_QK - widen(m_next_QW, s_QK.shape[1]))
  alpha_QW = jnp.exp(m_QW - m_next_QW)  # Rescales what was summed under the old max.
  l_next_QW = alpha_QW * l_QW + jnp.sum(p_QK, axis=1, keepdims=True)
  # P is rounded to V's dtype for the matmul (bf16 on accelerators), as the XLA reference does.
  acc_next_QD = widen(alpha_QW, acc_QD.shape[1]) * acc_QD + matmul(p_QK.astype(v_KD.dtype), v_KD)
  return m_next_QW, l_next_QW, acc_next_QD


def finish_softmax(m_QW, l_QW, acc_QD):
  """Normalised output [Q, D] (float32) and the row logsumexp [Q, W] kept for the backward.

  `l` >= 1 for every row: the row max is attained by some visited entry, contributing exp(0).
  """
  out_QD = acc_QD / widen(l_QW, acc_QD.shape[1])
  return out_QD, m_QW + jnp.log(l_QW)


def recomputed_probs(s_QK, lse_QW):
  """P = exp(S - logsumexp): the forward's softmax, rebuilt from masked logits."""
  return jnp.exp(s_QK - widen(lse_QW, s_QK.shape[1]))


def logits_grad(p_QK, do_QD, v_KD, delta_QW):
  """dS = P * (dO Vᵀ - rowsum(dO * O)): the softmax Jacobian applied to dP (2307.08691 eq. 4)."""
  dp_QK = matmul_nt(do_QD, v_KD)
  return p_QK * (dp_QK - widen(delta_QW, p_QK.shape[1]))
