"""Grouped-query self-attention and the one dispatch point for attention implementations.

`dot_product_attention` is the only place the model computes softmax(QKᵀ)V. The model owns the
table of implementations, `ATTENTION_IMPLS`: the XLA ones live here, and the kernels (Pallas,
cuDNN, splash) are looked up by name in `jaxlm.kernels.attention_impls`, imported on first use.
All share one signature, so the model code never changes between them (MaxText dispatches the
same way). The kernels never import the model; both take the mask from `jaxlm.masking`.
"""

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.masking import MASK_VALUE, attention_mask
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import Role, apply_rope, matmul, matrix_param, param_with_axes


def xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True):
  """Reference attention in plain XLA ops. GQA without repeating K/V: query heads are viewed as
  [kv_heads, group] so each group shares its K/V head through the einsum."""
  b, l, h, k = q_BLHK.shape
  g = k_BSGK.shape[2]
  q_BLGRK = q_BLHK.reshape(b, l, g, h // g, k)
  logits_BGRLS = jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * k ** -0.5
  mask_BLS = attention_mask(segment_ids_BL, segment_ids_BL, causal)
  logits_BGRLS = jnp.where(mask_BLS[:, None, None], logits_BGRLS, MASK_VALUE)
  probs_BGRLS = jax.nn.softmax(logits_BGRLS, axis=-1).astype(v_BSGK.dtype)
  out_BLGRK = jnp.einsum("bgrls,bsgk->blgrk", probs_BGRLS, v_BSGK)
  return out_BLGRK.reshape(b, l, h, k)


def cached_attention(q_BLHK, k_BGSK, v_BGSK, q_segments_BL, k_segments_BS, q_offset):
  """Causal attention of a chunk of queries, the sequence's rows q_offset.. (may be traced), over
  a KV cache of S slots holding the keys of every row so far, the chunk's included; slots not
  yet written are hidden by the causal mask. Plain XLA: a decode step has one query row, where a
  flash kernel has nothing to tile. The cache keeps heads before length ([B, kv_heads, S, K]),
  so both matmuls read it in place: in [B, S, kv_heads, K] XLA on CPU transposed the whole
  cache of every layer at every step (decode steps 1.8x slower at S=544, batch 4)."""
  b, l, h, k = q_BLHK.shape
  g = k_BGSK.shape[1]
  q_BGRLK = q_BLHK.reshape(b, l, g, h // g, k).transpose(0, 2, 3, 1, 4)
  logits_BGRLS = jnp.einsum("bgrlk,bgsk->bgrls", q_BGRLK, k_BGSK,
                            preferred_element_type=jnp.float32) * k ** -0.5
  mask_BLS = attention_mask(q_segments_BL, k_segments_BS, True, q_offset)
  logits_BGRLS = jnp.where(mask_BLS[:, None, None], logits_BGRLS, MASK_VALUE)
  probs_BGRLS = jax.nn.softmax(logits_BGRLS, axis=-1).astype(v_BGSK.dtype)
  out_BGRLK = jnp.einsum("bgrls,bgsk->bgrlk", probs_BGRLS, v_BGSK)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)


def causal_block_size(length: int) -> int:
  """Query rows per block for `xla_blocked_attention`: four blocks, at least 64 rows. Measured on
  this project's 2-core CPU (bench train steps, float32): at L=256 64-row blocks beat 128 and 256
  (367 / 387 / 409 ms), at L=512 128 and 96 beat 64 and 256 (3.67 / 3.67 / 3.88 / 3.81 s): more
  blocks skip more masked work, but each is its own small ops, whose overhead then wins."""
  return max(64, -(-length // 4))


def xla_blocked_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True,
                          block: int | None = None):
  """Causal attention in plain XLA ops that never computes a fully masked score block.

  Queries are cut into blocks of `block` rows and block i attends only to the keys before its
  end, so about half of the [L, L] scores (and their softmax and backward) are never formed:
  (n+1)/2n of the dense work for n blocks. Each row still sees all of its unmasked keys at once,
  so this is the same softmax as `xla_attention`, not an online (flash) one. Heads move in front
  of the length axis first, so every block is a plain batched matmul. What 'auto' runs on CPU."""
  if not causal:
    return xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=False)
  b, l, h, k = q_BLHK.shape
  g = k_BSGK.shape[2]
  block = block or causal_block_size(l)
  q_BGRLK = q_BLHK.reshape(b, l, g, h // g, k).transpose(0, 2, 3, 1, 4)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  out_blocks = []
  for start in range(0, l, block):
    end = min(start + block, l)
    logits_BGRLS = jnp.einsum("bgrlk,bgsk->bgrls", q_BGRLK[:, :, :, start:end],
                              k_BGSK[:, :, :end], preferred_element_type=jnp.float32) * k ** -0.5
    mask_BLS = attention_mask(segment_ids_BL[:, start:end], segment_ids_BL[:, :end], True, start)
    logits_BGRLS = jnp.where(mask_BLS[:, None, None], logits_BGRLS, MASK_VALUE)
    probs_BGRLS = jax.nn.softmax(logits_BGRLS, axis=-1).astype(v_BSGK.dtype)
    out_blocks.append(jnp.einsum("bgrls,bgsk->bgrlk", probs_BGRLS, v_BGSK[:, :, :end]))
  out_BGRLK = jnp.concatenate(out_blocks, axis=3)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)


def _kernel_impls():
  # Imported on first use, not at the top: a model that only runs XLA never imports Pallas.
  import jaxlm.kernels.attention_impls as attention_impls  # pylint: disable=import-outside-toplevel
  return attention_impls


class _ImplTable(Mapping):
  """Implementation name -> attention function. A value that is a string names a function in
  `jaxlm.kernels.attention_impls`, fetched when it is looked up."""

  def __init__(self, **impls: Callable | str):
    self._impls = impls

  def __getitem__(self, name: str) -> Callable:
    impl = self._impls[name]
    return getattr(_kernel_impls(), impl) if isinstance(impl, str) else impl

  def __contains__(self, name) -> bool:  # Mapping's would look the value up: an import.
    return name in self._impls

  def __iter__(self) -> Iterator[str]:
    return iter(self._impls)

  def __len__(self) -> int:
    return len(self._impls)


def auto_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True):
  """The best implementation available for these inputs on this backend (see
  `choose_attention_impl`)."""
  impl = ATTENTION_IMPLS[_kernel_impls().choose_attention_impl(q_BLHK)]
  return impl(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=causal)


ATTENTION_IMPLS = _ImplTable(xla=xla_attention, xla_blocked=xla_blocked_attention,
                             pallas="pallas_attention", cudnn="cudnn_attention",
                             splash="splash_attention", auto=auto_attention)
# Implementations made of XLA ops: XLA partitions them itself (no shard_map needed).
XLA_IMPLS = ("xla", "xla_blocked")


def dot_product_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True,
                          impl: str = "xla"):
  """softmax(QKᵀ/√d + mask)V with document masking; `impl` picks the implementation."""
  if impl == "auto":  # Resolved here, so that an XLA choice is not wrapped like a kernel below.
    impl = _kernel_impls().choose_attention_impl(q_BLHK)
  if impl not in ATTENTION_IMPLS:
    raise UserError(f"attention_impl={impl!r} is not available; choose one of "
                    f"{sorted(ATTENTION_IMPLS)}")
  fn = functools.partial(ATTENTION_IMPLS[impl], causal=causal)
  if impl not in XLA_IMPLS:  # XLA partitions its own ops; a kernel needs to be handed its shard.
    fn = _per_shard(fn)
  return fn(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)


def _per_shard(fn):
  """Run a kernel on each device's block of the batch and heads (shard_map), when a mesh and
  logical rules are active: a custom kernel has no SPMD partitioning rule, so without this XLA
  would gather whole arrays onto every device. Attention is independent per example and per
  head, and GQA groups stay whole because kv_heads split the same way as heads."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return fn
  specs = [nn.logical_to_mesh_axes(names, rules) for names in (
      ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim"),
      ("batch", "length", "kv_heads", "head_dim"), ("batch", "length"))]

  def splits_evenly(*arrays):
    for array, spec in zip(arrays, specs):
      for dim, axes in zip(array.shape, spec):
        axes = axes if isinstance(axes, tuple) else (axes,)
        if dim % math.prod(mesh.shape[a] for a in axes if a is not None):
          return False
    return True

  sharded = jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0],
                          check_vma=False)
  # Shapes that do not split (e.g. the 1x1 trace at init) run the kernel on whole arrays.
  return lambda *arrays: sharded(*arrays) if splits_evenly(*arrays) else fn(*arrays)


class CacheSlots(NamedTuple):
  """Where a decoding call's chunk of L tokens goes in the KV cache (built by the Decoder from its
  'cache' collection, see jaxlm.model.transformer.init_cache)."""
  index: jax.Array  # int32 scalar: the cache slot of the chunk's first token.
  segment_ids_BS: jax.Array  # Every slot's segment id, the chunk's included (0: empty/padding).
  prefill: bool  # The cache is empty and index is 0: attend within the chunk only.


def uninitialized_cache(*_):
  raise ValueError("decoding needs a KV cache; build it with "
                   "jaxlm.model.transformer.init_cache(config, batch, max_len)")


class Attention(nn.Module):
  """Grouped-query attention (Ainslie et al. 2023, 2305.13245) with rotary positions.

  With `cache_slots` (decoding), the chunk's keys and values are written into the 'cache'
  collection (`key`, `value`: [B, kv_heads, S, head_dim]) at `cache_slots.index`, and its queries
  attend to every slot written so far. Without, nothing touches the cache (training)."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {
      "query": Role("attention.query", reads=("embed",)),
      "key": Role("attention.key", reads=("embed",)),
      "value": Role("attention.value", reads=("embed",)),
      "out": Role("attention.out", reads=("heads", "head_dim")),
      "query_bias": Role("attention.query_bias", matmul=False),
      "key_bias": Role("attention.key_bias", matmul=False),
      "value_bias": Role("attention.value_bias", matmul=False)}

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache_slots: CacheSlots | None = None):
    cfg = self.config
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    pd, dtype = cfg.param_dtype, cfg.compute_dtype
    w_q = matrix_param(self, "query", init, (d, h, k), ("embed", "heads", "head_dim"))
    w_k = matrix_param(self, "key", init, (d, g, k), ("embed", "kv_heads", "head_dim"))
    w_v = matrix_param(self, "value", init, (d, g, k), ("embed", "kv_heads", "head_dim"))
    w_o = matrix_param(self, "out", out_init, (h, k, d), ("heads", "head_dim", "embed"))

    q_BLHK = matmul("bld,dhk->blhk", x_BLD, w_q)
    k_BLGK = matmul("bld,dgk->blgk", x_BLD, w_k)
    v_BLGK = matmul("bld,dgk->blgk", x_BLD, w_v)
    if cfg.attention_bias:  # Before RoPE and the cache write, as Qwen2 adds them.
      zeros = nn.initializers.zeros
      b_q = param_with_axes(self, "query_bias", zeros, (h, k), ("heads", "head_dim"), pd)
      b_k = param_with_axes(self, "key_bias", zeros, (g, k), ("kv_heads", "head_dim"), pd)
      b_v = param_with_axes(self, "value_bias", zeros, (g, k), ("kv_heads", "head_dim"), pd)
      q_BLHK = q_BLHK + b_q.astype(dtype)
      k_BLGK = k_BLGK + b_k.astype(dtype)
      v_BLGK = v_BLGK + b_v.astype(dtype)
    scaling = cfg.rope_scaling_params
    q_BLHK = apply_rope(q_BLHK, positions_BL, cfg.rope_theta, cfg.max_seq_len, scaling)
    k_BLGK = apply_rope(k_BLGK, positions_BL, cfg.rope_theta, cfg.max_seq_len, scaling)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("batch", "length", "heads", "head_dim"))
    k_BLGK = nn.with_logical_constraint(k_BLGK, ("batch", "length", "kv_heads", "head_dim"))
    v_BLGK = nn.with_logical_constraint(v_BLGK, ("batch", "length", "kv_heads", "head_dim"))

    if cache_slots is None:
      out_BLHK = dot_product_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=True,
                                       impl=cfg.attention_impl)
    else:
      axes = ("batch", "kv_heads", "length", "head_dim")
      start = (0, 0, cache_slots.index, 0)
      cached = []
      for name, new_BLGK in (("key", k_BLGK), ("value", v_BLGK)):
        variable = self.variable("cache", name, uninitialized_cache)
        new_BGLK = new_BLGK.transpose(0, 2, 1, 3).astype(variable.value.dtype)
        variable.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(variable.value, new_BGLK, start), axes)
        cached.append(variable.value)
      if cache_slots.prefill:  # Nothing before the chunk: the training path's implementation.
        out_BLHK = dot_product_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=True,
                                         impl=cfg.attention_impl)
      else:
        out_BLHK = cached_attention(q_BLHK, *[c.astype(dtype) for c in cached], segment_ids_BL,
                                    cache_slots.segment_ids_BS, cache_slots.index)
    # Each head's output, named by its axis, for whoever applies with mutable=["activations"]
    # (subcloning's importance scores); nothing is kept otherwise.
    self.sow("activations", "heads", out_BLHK)
    return matmul("blhk,hkd->bld", out_BLHK, w_o)
