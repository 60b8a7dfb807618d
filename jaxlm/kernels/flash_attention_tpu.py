"""Flash attention kernels in the TPU (Mosaic) style: the reduction is a sequential grid axis.

A TPU core runs the grid in order, so the loop over the other sequence is the innermost grid
axis (`arbitrary`), Pallas double-buffers each K/V (or Q/dO) tile from HBM into VMEM, and the
running statistics live in VMEM scratch that persists across grid steps. Only one tile of each
operand is resident at a time, so VMEM use does not grow with the sequence length.

Layout follows Mosaic's (8 sublanes x 128 lanes) tiling, as splash attention does:
  q, k, v, o         [batch, heads, length, dim]   (transposed from the model's layout here)
  query segment ids  [batch, length, 128]          a column per query block, lane-replicated
  key segment ids    [batch, 8, length]            a row per key block, sublane-replicated
  row statistics     [rows, 128] lane-replicated in scratch; [batch, heads, 1, length] between
                     kernels (a compact row the backward kernels expand to a [rows, 1] column)
Block sizes must be multiples of 128 (or the whole padded length) for these layouts.

Causal masking skips fully masked tiles twice over: `pl.when` skips their compute, and the index
maps clamp to the last needed tile so the pipeline does not fetch them (same block index as the
previous step means no new DMA).

Kernels (FlashAttention-2, 2307.08691): forward grid (b, h, q block, k block); dq grid
(b, h, q block, k block); dk/dv grid (b, kv head, k block, query head in group, q block) so the
R query heads of a group accumulate into one dK/dV tile without repeating K/V.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.kernels import flash_tiles as tiles

LANES, SUBLANES = 128, 8


# Index arithmetic uses lax.div, not //: indices are non-negative, and floor division adds a sign
# fix-up that Mosaic lowers per chip generation.
def _last_visible_k_block(i, block_q, block_k):
  return lax.div((i + 1) * block_q - 1, block_k)


def _first_visible_q_block(j, block_q, block_k):
  return lax.div(j * block_k, block_q)


def _when_visible(causal: bool, visible):
  """pl.when(visible) for causal attention; every tile is visible otherwise."""
  return pl.when(visible) if causal else (lambda fn: fn())


def _segment_layouts(segment_ids_BL):
  b, l = segment_ids_BL.shape
  return (jnp.broadcast_to(segment_ids_BL[:, :, None], (b, l, LANES)),
          jnp.broadcast_to(segment_ids_BL[:, None, :], (b, SUBLANES, l)))


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
                    m_ref, l_ref, acc_ref, *, plan):
  i, j = pl.program_id(2), pl.program_id(3)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_ref[...], l_ref[...], acc_ref[...] = tiles.initial_stats(block_q, LANES, acc_ref.shape[1])

  @_when_visible(plan.causal, j <= _last_visible_k_block(i, block_q, block_k))
  def _step():
    mask_QK = tiles.tile_mask(tiles.widen(q_seg_ref[...], block_k), kv_seg_ref[:1, :],
                              i * block_q, j * block_k, (block_q, block_k), causal=plan.causal,
                              kv_len=plan.kv_len_if_padded)
    s_QK = tiles.masked_logits(q_ref[...], k_ref[...], mask_QK, plan.scale)
    m_ref[...], l_ref[...], acc_ref[...] = tiles.online_softmax_step(
        s_QK, v_ref[...], m_ref[...], l_ref[...], acc_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    out_QD, lse_QW = tiles.finish_softmax(m_ref[...], l_ref[...], acc_ref[...])
    o_ref[...] = out_QD.astype(o_ref.dtype)
    lse_ref[...] = lse_QW


def forward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, plan):
  """(out_BLHK, lse_BHL float32)."""
  b, l, h, d = q_BLHK.shape
  group, bq, bk = h // k_BSGK.shape[2], plan.block_q, plan.block_k
  q_seg, kv_seg = _segment_layouts(segment_ids_BL)

  def kv_block(i, j):
    return jnp.minimum(j, _last_visible_k_block(i, bq, bk)) if plan.causal else j

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, j: (b, lax.div(h, group), kv_block(i, j), 0))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan),
      grid=(b, h, l // bq, plan.num_kv_blocks(bk)),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, h, l, d), q_BLHK.dtype),
                 jax.ShapeDtypeStruct((b, h, l, LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=plan.interpret,
      name="flash_attention_forward",
  )(q_BLHK.transpose(0, 2, 1, 3), k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3),
    q_seg, kv_seg)
  return out.transpose(0, 2, 1, 3), lse[..., 0]


def _tile_grads(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                q_start, k_start, plan):
  """(p, ds) for one tile, recomputed from the saved logsumexp."""
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  mask_QK = tiles.tile_mask(tiles.widen(q_seg_ref[...], block_k), kv_seg_ref[:1, :], q_start,
                            k_start, (block_q, block_k), causal=plan.causal,
                            kv_len=plan.kv_len_if_padded)
  s_QK = tiles.masked_logits(q_ref[...], k_ref[...], mask_QK, plan.scale)
  p_QK = tiles.recomputed_probs(s_QK, lse_ref[0][:, None])
  return p_QK, tiles.logits_grad(p_QK, do_ref[...], v_ref[...], delta_ref[0][:, None])


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
               dq_acc_ref, *, plan):
  i, j = pl.program_id(2), pl.program_id(3)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros_like(dq_acc_ref)

  @_when_visible(plan.causal, j <= _last_visible_k_block(i, block_q, block_k))
  def _step():
    _, ds_QK = _tile_grads(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref,
                           delta_ref, i * block_q, j * block_k, plan)
    dq_acc_ref[...] += tiles.matmul(ds_QK.astype(k_ref.dtype), k_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * plan.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, plan):
  j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
    dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

  @_when_visible(plan.causal, i >= _first_visible_q_block(j, block_q, block_k))
  def _step():
    p_QK, ds_QK = _tile_grads(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref,
                              delta_ref, i * block_q, j * block_k, plan)
    dv_acc_ref[...] += tiles.matmul_tn(p_QK.astype(do_ref.dtype), do_ref[...])
    dk_acc_ref[...] += tiles.matmul_tn(ds_QK.astype(q_ref.dtype), q_ref[...])

  @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, lse_BHL, delta_BHL, do_BLHK, plan):
  """(dq, dk, dv) in the layouts and dtypes of (q, k, v)."""
  b, l, h, d = q_BLHK.shape
  g = k_BSGK.shape[2]
  group, bq, bk = h // g, plan.block_q_bwd, plan.block_k_bwd
  q_BHLK, do_BHLK = q_BLHK.transpose(0, 2, 1, 3), do_BLHK.transpose(0, 2, 1, 3)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  q_seg, kv_seg = _segment_layouts(segment_ids_BL)
  lse_BH1L, delta_BH1L = lse_BHL[:, :, None, :], delta_BHL[:, :, None, :]
  operands = (q_BHLK, k_BGSK, v_BGSK, q_seg, kv_seg, do_BHLK, lse_BH1L, delta_BH1L)

  def kv_block(i, j):
    return jnp.minimum(j, _last_visible_k_block(i, bq, bk)) if plan.causal else j

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, j: (b, lax.div(h, group), kv_block(i, j), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
  dq_BHLK = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(b, h, l // bq, plan.num_kv_blocks(bk)),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j))),
                q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_BHLK.shape, q_BHLK.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=plan.interpret,
      name="flash_attention_dq",
  )(*operands)

  def q_block(i, j):
    return jnp.maximum(i, _first_visible_q_block(j, bq, bk)) if plan.causal else i

  q_spec = pl.BlockSpec((None, None, bq, d),
                        lambda b, g, j, r, i: (b, g * group + r, q_block(i, j), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, g, j, r, i: (b, g, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq),
                          lambda b, g, j, r, i: (b, g * group + r, 0, q_block(i, j)))
  dk_BGSK, dv_BGSK = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=plan),
      # Query blocks made only of length padding carry dO = 0 and are not visited.
      grid=(b, g, l // bk, group, plan.num_q_blocks(bq)),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, LANES), lambda b, g, j, r, i: (b, q_block(i, j), 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b, g, j, r, i: (b, 0, j)),
                q_spec, row_spec, row_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BGSK.shape, k_BGSK.dtype),
                 jax.ShapeDtypeStruct(v_BGSK.shape, v_BGSK.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=plan.interpret,
      name="flash_attention_dkdv",
  )(*operands)
  return (dq_BHLK.transpose(0, 2, 1, 3), dk_BGSK.transpose(0, 2, 1, 3),
          dv_BGSK.transpose(0, 2, 1, 3))
