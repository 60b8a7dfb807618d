"""Width growth of a trained Llama-style model: MLP units, attention heads (whole GQA groups) and
the residual width d_model, as pure functions on param pytrees.

    large = grow_width(params, small_cfg, large_cfg, fresh=init_params(large_cfg, rng),
                       mlp="fpi", heads="fpi", d_model="exact")

- mlp="fpi": bert2BERT's function-preserving init (2110.07143, after Net2Net 1511.05641): new
  units copy unit j mod F, every copy's `down` row divided by its copy count. Exact.
  mlp="aki": bert2BERT's advanced knowledge init: new units of layer l copy the units of layer
  l+1 (the last layer copies itself), divided the same way. Not function-preserving: layer l
  gains layer l+1's units; the paper finds it trains faster than FPI.
  mlp="zero": new units freshly initialised, their `down` rows zero. Exact.
- heads="fpi": whole KV groups copied with their query heads, `out` rows divided by the copy
  count; head_dim and the GQA ratio stay. Exact. heads="zero": new groups fresh, `out` zero.
- d_model="exact": new residual dimensions zero (zero embedding columns and output-projection
  columns; fresh rows where weights read them, which see zeros) and every RMSNorm gain scaled
  by sqrt(D_old / D_new): the RMS over the wider stream is sqrt(D_old / D_new) times the old
  one. Exact when the large model's norm_eps is eps * D_old / D_new (`exact_norm_eps`; checked).
  d_model="copy": bert2BERT-style copies of dimensions (readers divided). Under RMSNorm it is
  exact only when every dimension is copied equally often (D_new a multiple of D_old: the RMS
  of the duplicated stream is the old RMS) and norm_eps stays (not checked); otherwise the
  duplicated dimensions weigh more in the RMS and it is approximate (|dlogit| 0.33 for
  32 -> 48 in tests/test_growth.py).
When d_model does not grow, the large model's norm_eps must be the small one's (checked).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.methods.growth.axis_maps import AxisMap, copy_map, group_copy_map, grow_leaf, pad_map
from jaxlm.model import ModelConfig
from jaxlm.model.anatomy import Anatomy, Part, anatomy

MLP_MODES = ("fpi", "aki", "zero")
HEAD_MODES = ("fpi", "zero")
D_MODEL_MODES = ("exact", "copy")


def exact_norm_eps(small: ModelConfig, d_model: int) -> float:
  """The norm epsilon that makes d_model="exact" growth to `d_model` exact."""
  return small.norm_eps * small.d_model / d_model


def _check_choice(name, value, choices):
  if value not in choices:
    raise UserError(f"grow_width.{name}={value!r}; choose one of {list(choices)}")


def check_width(small: ModelConfig, large: ModelConfig, mlp: str, heads: str,
                d_model: str) -> None:
  """One line for each way `large` cannot be grown from `small` in width."""
  _check_choice("mlp", mlp, MLP_MODES)
  _check_choice("heads", heads, HEAD_MODES)
  _check_choice("d_model", d_model, D_MODEL_MODES)
  for field in ("d_model", "mlp_dim", "num_heads", "num_kv_heads"):
    have, want = getattr(small, field), getattr(large, field)
    if want < have:
      raise UserError(f"width growth cannot shrink ModelConfig.{field} {have} -> {want}; "
                      "to make a smaller model use weight subcloning (tools/subclone.py)")
  for field in ("vocab_size", "tie_embeddings", "attention_bias", "mlp"):
    if getattr(small, field) != getattr(large, field):
      raise UserError(f"width growth keeps ModelConfig.{field} ({getattr(small, field)!r} -> "
                      f"{getattr(large, field)!r}); change it in a separate transition")
  if small.resolved_head_dim != large.resolved_head_dim:
    raise UserError(f"width growth keeps head_dim ({small.resolved_head_dim} -> "
                    f"{large.resolved_head_dim}): heads are copied whole; set "
                    "ModelConfig.head_dim in both stages")
  ratio, new_ratio = small.num_heads // small.num_kv_heads, large.num_heads // large.num_kv_heads
  if ratio != new_ratio:
    raise UserError(f"head growth keeps the GQA ratio num_heads/num_kv_heads ({ratio}), but the "
                    f"large model has {large.num_heads}/{large.num_kv_heads} = {new_ratio}; "
                    f"set num_heads = {ratio} x num_kv_heads")
  if large.d_model == small.d_model and not math.isclose(large.norm_eps, small.norm_eps,
                                                         rel_tol=1e-6):
    # Growing d_model is checked below; an unchanged d_model needs the same epsilon, or the
    # FPI/zero growth of bert2BERT (2110.07143) is not function-preserving (|dlogit| ~5e-4).
    raise UserError(f"width growth keeps d_model {small.d_model}, so it is exact only with the "
                    f"same ModelConfig.norm_eps, but it changes {small.norm_eps} -> "
                    f"{large.norm_eps}; set the large model's norm_eps = {small.norm_eps}")
  if large.d_model > small.d_model and d_model == "exact":
    want = exact_norm_eps(small, large.d_model)
    if not math.isclose(large.norm_eps, want, rel_tol=1e-6):
      raise UserError(f"exact d_model growth {small.d_model} -> {large.d_model} needs the large "
                      f"model's ModelConfig.norm_eps = {small.norm_eps} x {small.d_model}/"
                      f"{large.d_model} = {want:.6g} (it is {large.norm_eps}); set it, or use "
                      "d_model='copy' (approximate)")
  if d_model == "copy" and large.d_model > small.d_model and small.tie_embeddings:
    raise UserError("d_model='copy' cannot grow tied embeddings (the table is both written and "
                    "read); use d_model='exact'")


def width_maps(small: ModelConfig, large: ModelConfig, mlp: str = "fpi", heads: str = "fpi",
               d_model: str = "exact") -> dict[str, AxisMap]:
  """{logical axis: AxisMap} for the axes that grow."""
  maps = {}
  if large.mlp_dim > small.mlp_dim:
    maps["mlp"] = (pad_map(small.mlp_dim, large.mlp_dim, "read") if mlp == "zero"
                   else copy_map(small.mlp_dim, large.mlp_dim))
  if large.num_kv_heads > small.num_kv_heads:
    per_group = small.num_heads // small.num_kv_heads
    if heads == "zero":
      maps["kv_heads"] = pad_map(small.num_kv_heads, large.num_kv_heads, "read")
      maps["heads"] = pad_map(small.num_heads, large.num_heads, "read")
    else:
      maps["kv_heads"], maps["heads"] = group_copy_map(small.num_kv_heads, large.num_kv_heads,
                                                       per_group)
  if large.d_model > small.d_model:
    maps["embed"] = (pad_map(small.d_model, large.d_model, "write") if d_model == "exact"
                     else copy_map(small.d_model, large.d_model))
  return maps


def _norm_scale(x, amap: AxisMap | None, exact: bool, moments: bool = False):
  if amap is None:
    return x
  grown = x[np.maximum(amap.source, 0)]
  if moments:  # A moment's new entries are zero (as for every other leaf), not dimension 0's.
    return jnp.where(amap.is_new, jnp.zeros_like(grown), grown)
  if exact:  # RMS over D_new dims = sqrt(D_old / D_new) x RMS over the old ones.
    grown = grown * np.float32(math.sqrt(np.sum(~amap.is_new) / amap.size))
  return grown


def grow_tree(tree, parts: Anatomy, maps: dict[str, AxisMap], fresh=None,
              d_model: str = "exact", moments: bool = False):
  """Every leaf of the param-shaped `tree` grown by `maps` (`parts`: the large model's anatomy
  at the tree's depth; `fresh`: its fresh params, or None for zeros). `moments`: an optimizer
  moment tree, which takes the index maps only (copies unscaled, new entries zero)."""
  if moments:
    maps = {k: dataclasses.replace(m, read_scale=np.ones(m.size)) for k, m in maps.items()}

  def grow(path, x, new=None):
    part = parts[tuple(str(k.key) for k in path)]
    if part.kind == "norm":
      return _norm_scale(x, maps.get("embed"), d_model == "exact" and not moments, moments)
    return grow_leaf(x, part, maps, None if moments else new)

  if fresh is None:
    return jax.tree_util.tree_map_with_path(grow, tree)
  return jax.tree_util.tree_map_with_path(grow, tree, fresh)


def grow_width(params, small: ModelConfig, large: ModelConfig, fresh, mlp: str = "fpi",
               heads: str = "fpi", d_model: str = "exact"):
  """The small model's params grown in width to `large` (see the module docstring); `fresh`:
  the large model's own initialisation (of the same depth as `params`)."""
  check_width(small, large, mlp, heads, d_model)
  maps = width_maps(small, large, mlp, heads, d_model)
  parts = anatomy(dataclasses.replace(large, num_layers=small.num_layers))
  grown = grow_tree(params, parts, maps, fresh, d_model)
  if mlp == "aki" and "mlp" in maps:  # New units of block l come from block l + 1.
    new_units = np.arange(large.mlp_dim) >= small.mlp_dim
    for l in range(small.num_layers - 1):
      for part in parts.block_parts(l):
        if "mlp" in part.axes:
          above = dataclasses.replace(part, path=(parts.block_key(l + 1), *part.path[1:]))
          grown = _set(grown, part.path, _units_from(part, part.get(grown), above.get(grown),
                                                     new_units))
  return grown


def _units_from(part: Part, leaf, above, new_units):
  """`leaf` with the MLP units flagged in `new_units` (along its "mlp" axis) taken from the same
  part of the block above."""
  axis = part.axes.index("mlp")
  return jnp.where(new_units.reshape([-1 if i == axis else 1 for i in range(leaf.ndim)]),
                   above, leaf)


def _set(tree, path, value):
  head, *rest = path
  return {**tree, head: _set(tree[head], rest, value) if rest else value}
