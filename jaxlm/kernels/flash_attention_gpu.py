"""Flash attention kernels in the GPU (Triton) style: one program per query (or key) block.

Triton programs in a grid run concurrently and cannot carry state from one grid step to the
next, so each program loops over the other sequence inside the kernel (`lax.fori_loop`), with
the running statistics in registers. Tensors stay in the model's [batch, length, heads, dim]
layout: a block is a strided window, so no transpose is needed around the kernel.

Kernels (FlashAttention-2, 2307.08691):
  forward   grid (q blocks, batch, heads): loop over key blocks; writes O and logsumexp.
  dq        grid (q blocks, batch, heads): loop over key blocks; dQ = Σ dS K.
  dk, dv    grid (k blocks, batch, kv heads): loop over (query head in the group, q block);
            the R query heads sharing a KV head are summed inside the kernel, so grouped-query
            attention never materialises repeated K/V or per-query-head dK/dV.
Causal programs stop (or start) their loop at the diagonal, skipping fully masked blocks.

Triton needs power-of-two tile sizes: the caller pads the head dim and picks power-of-two blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlm.kernels import flash_tiles as tiles


def _compiler_params(head_dim: int):
  # 4 warps suit 64-wide heads; wider heads need more threads for the [block, D] accumulators.
  return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _num_kv_blocks_to_visit(i, block_q, block_k, num_kv_blocks, causal):
  """Key blocks a causal query block i needs: those starting at or before its last row."""
  if not causal:
    return num_kv_blocks
  return jnp.minimum(lax.div((i + 1) * block_q + block_k - 1, block_k), num_kv_blocks)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, plan):
  block_q, head_dim = q_ref.shape
  block_k = plan.block_k
  i = pl.program_id(0)
  q_QD, q_seg_Q1 = q_ref[...], q_seg_ref[...][:, None]

  def step(j, carry):
    start = pl.multiple_of(j * block_k, block_k)
    kv_seg_1K = kv_seg_ref[pl.ds(start, block_k)][None, :]
    mask_QK = tiles.tile_mask(q_seg_Q1, kv_seg_1K, i * block_q, start, (block_q, block_k),
                              causal=plan.causal, kv_len=plan.kv_len_if_padded)
    s_QK = tiles.masked_logits(q_QD, k_ref[pl.ds(start, block_k), :], mask_QK, plan.scale)
    return tiles.online_softmax_step(s_QK, v_ref[pl.ds(start, block_k), :], *carry)

  num_visits = _num_kv_blocks_to_visit(i, block_q, block_k, plan.num_kv_blocks(block_k),
                                       plan.causal)
  stats = lax.fori_loop(0, num_visits, step, tiles.initial_stats(block_q, 1, head_dim))
  out_QD, lse_Q1 = tiles.finish_softmax(*stats)
  o_ref[...] = out_QD.astype(o_ref.dtype)
  lse_ref[...] = lse_Q1[:, 0]


def forward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, plan):
  """(out_BLHK, lse_BHL float32)."""
  b, l, h, d = q_BLHK.shape
  g = k_BSGK.shape[2]
  bq, group = plan.block_q, h // g
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, l, None, d), lambda i, b, h: (b, 0, lax.div(h, group), 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan),
      grid=(l // bq, b, h),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, l), lambda i, b, h: (b, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BLHK.shape, q_BLHK.dtype),
                 jax.ShapeDtypeStruct((b, h, l), jnp.float32)],
      compiler_params=_compiler_params(d),
      interpret=plan.interpret,
      name="flash_attention_forward",
  )(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, segment_ids_BL)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, plan):
  block_q, head_dim = q_ref.shape
  block_k = plan.block_k_bwd
  i = pl.program_id(0)
  q_QD, do_QD, q_seg_Q1 = q_ref[...], do_ref[...], q_seg_ref[...][:, None]
  lse_Q1, delta_Q1 = lse_ref[...][:, None], delta_ref[...][:, None]

  def step(j, dq_QD):
    start = pl.multiple_of(j * block_k, block_k)
    k_KD = k_ref[pl.ds(start, block_k), :]
    kv_seg_1K = kv_seg_ref[pl.ds(start, block_k)][None, :]
    mask_QK = tiles.tile_mask(q_seg_Q1, kv_seg_1K, i * block_q, start, (block_q, block_k),
                              causal=plan.causal, kv_len=plan.kv_len_if_padded)
    p_QK = tiles.recomputed_probs(tiles.masked_logits(q_QD, k_KD, mask_QK, plan.scale), lse_Q1)
    ds_QK = tiles.logits_grad(p_QK, do_QD, v_ref[pl.ds(start, block_k), :], delta_Q1)
    return dq_QD + tiles.matmul(ds_QK.astype(k_KD.dtype), k_KD)

  num_visits = _num_kv_blocks_to_visit(i, block_q, block_k, plan.num_kv_blocks(block_k),
                                       plan.causal)
  dq_QD = lax.fori_loop(0, num_visits, step, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_QD * plan.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, plan, group: int):
  block_k, head_dim = k_ref.shape
  block_q = plan.block_q_bwd
  j, g = pl.program_id(0), pl.program_id(2)
  k_KD, v_KD, kv_seg_1K = k_ref[...], v_ref[...], kv_seg_ref[...][None, :]
  # Causal: query blocks ending before this key block's first key see none of it.
  first = lax.div(j * block_k, block_q) if plan.causal else 0
  num_q = plan.num_q_blocks(block_q) - first

  def step(t, carry):
    dk_KD, dv_KD = carry
    head = g * group + lax.div(t, num_q)
    start = pl.multiple_of((first + lax.rem(t, num_q)) * block_q, block_q)
    rows = pl.ds(start, block_q)
    q_QD, do_QD = q_ref[rows, head, :], do_ref[rows, head, :]
    mask_QK = tiles.tile_mask(q_seg_ref[rows][:, None], kv_seg_1K, start, j * block_k,
                              (block_q, block_k), causal=plan.causal, kv_len=plan.kv_len_if_padded)
    p_QK = tiles.recomputed_probs(tiles.masked_logits(q_QD, k_KD, mask_QK, plan.scale),
                                  lse_ref[head, rows][:, None])
    ds_QK = tiles.logits_grad(p_QK, do_QD, v_KD, delta_ref[head, rows][:, None])
    return (dk_KD + tiles.matmul_tn(ds_QK.astype(q_QD.dtype), q_QD),
            dv_KD + tiles.matmul_tn(p_QK.astype(do_QD.dtype), do_QD))

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk_KD, dv_KD = lax.fori_loop(0, group * num_q, step, (zeros, zeros))
  dk_ref[...] = (dk_KD * plan.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def backward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, lse_BHL, delta_BHL, do_BLHK, plan):
  """(dq, dk, dv) in the layouts and dtypes of (q, k, v)."""
  b, l, h, d = q_BLHK.shape
  g = k_BSGK.shape[2]
  group, bq, bk = h // g, plan.block_q_bwd, plan.block_k_bwd
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  whole_kv = pl.BlockSpec((None, l, None, d), lambda i, b, h: (b, 0, lax.div(h, group), 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(l // bq, b, h),
      in_specs=[q_spec, whole_kv, whole_kv,
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, l), lambda i, b, h: (b, 0)),
                q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_BLHK.shape, q_BLHK.dtype),
      compiler_params=_compiler_params(d),
      interpret=plan.interpret,
      name="flash_attention_dq",
  )(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, segment_ids_BL, do_BLHK, lse_BHL, delta_BHL)

  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, b, g: (b, j, g, 0))
  whole_q = pl.BlockSpec((None, l, h, d), lambda j, b, g: (b, 0, 0, 0))
  whole_rows = pl.BlockSpec((None, h, l), lambda j, b, g: (b, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=plan, group=group),
      grid=(l // bk, b, g),
      in_specs=[whole_q, kv_spec, kv_spec,
                pl.BlockSpec((None, l), lambda j, b, g: (b, 0)),
                pl.BlockSpec((None, bk), lambda j, b, g: (b, j)),
                whole_q, whole_rows, whole_rows],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BSGK.shape, k_BSGK.dtype),
                 jax.ShapeDtypeStruct(v_BSGK.shape, v_BSGK.dtype)],
      compiler_params=_compiler_params(d),
      interpret=plan.interpret,
      name="flash_attention_dkdv",
  )(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, segment_ids_BL, do_BLHK, lse_BHL, delta_BHL)
  return dq, dk, dv
