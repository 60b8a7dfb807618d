"""Width growth as one map per logical axis, applied to every parameter that has that axis.

A grown axis (`embed`, `mlp`, `heads`, `kv_heads`) is described by an `AxisMap`: for each index
of the large axis, the small index it copies (or -1: a new index with no source), and the
factor a copy is multiplied by where the axis is *read* (the weight's input side: divide by the
copy count, so duplicated activations sum to the original, Net2Net/bert2BERT FPI).

Every weight reads some axes and writes others, as the model's anatomy declares
(jaxlm/model/anatomy.py): `query` [embed, heads, head_dim] reads the residual (`embed`) and
writes heads; `out` [heads, head_dim, embed] reads heads and writes the residual. New indices
take zeros on one side and the large model's fresh initialisation on the
other (`AxisMap.zero_side`): new MLP units or heads have zero *readers* (their output weights),
so they add nothing yet still receive gradients; new residual dimensions have zero *writers*
(embedding columns, output projections), so the residual stream keeps zeros there, which an
RMSNorm over the wider stream needs (jaxlm.methods.growth.width.exact_d_model).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxlm.model.anatomy import Part

def side_of(part: Part, axis: str) -> str:
  """'read' when `part` (its anatomy entry) contracts `axis` with its input, else 'write'. A
  tied embedding table is also read (as the output head): width.check_width refuses growing it
  with copies."""
  return "read" if axis in part.reads else "write"


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """How one axis of size `len(source)` is filled from the small model's axis."""
  source: np.ndarray  # [new size] int: the small index copied, -1 for a new index.
  read_scale: np.ndarray  # [new size] float: multiplies copies on the read side (1/count).
  # New indices: zeros on this side, fresh values on the other (None: fresh on both sides).
  zero_side: str | None = "read"

  def __post_init__(self):
    if self.zero_side not in ("read", "write", None):
      raise ValueError(f"zero_side={self.zero_side!r}")

  @property
  def size(self) -> int:
    return len(self.source)

  @property
  def is_new(self) -> np.ndarray:
    return self.source < 0


def copy_map(old: int, new: int, sources=None) -> AxisMap:
  """Net2Net/bert2BERT function-preserving copies: index j < old keeps j, a new index copies
  `sources[j - old]` (default j mod old); every copy of i reads with 1/(copies of i)."""
  extra = np.arange(old, new) % old if sources is None else np.asarray(sources, np.int64)
  source = np.concatenate([np.arange(old), extra]).astype(np.int64)
  counts = np.bincount(source, minlength=old)
  return AxisMap(source, 1.0 / counts[source])


def group_copy_map(old_groups: int, new_groups: int, per_group: int) -> tuple[AxisMap, AxisMap]:
  """(kv_heads map, heads map) that copy whole GQA groups: new group j copies group j mod old,
  and with it its `per_group` query heads, so every query head keeps its own keys and values."""
  groups = copy_map(old_groups, new_groups)
  heads = (groups.source[:, None] * per_group + np.arange(per_group)[None]).reshape(-1)
  return groups, AxisMap(heads, np.repeat(groups.read_scale, per_group))


def pad_map(old: int, new: int, zero_side: str) -> AxisMap:
  """Old indices kept, new ones empty (zeros on `zero_side`, fresh values on the other)."""
  source = np.concatenate([np.arange(old), np.full(new - old, -1)]).astype(np.int64)
  return AxisMap(source, np.ones(new), zero_side)


def _along(values: np.ndarray, axis: int, ndim: int):
  shape = [1] * ndim
  shape[axis] = len(values)
  return values.reshape(shape)


def grow_leaf(x, part: Part, maps: dict[str, AxisMap], fresh=None):
  """The small leaf `x` grown by `maps` ({axis name: AxisMap}) along the logical axes of `part`
  (the large model's anatomy entry for it). `fresh`: the large model's own initialisation of
  this leaf (zeros for optimizer moments), used for new indices on their non-zero side; None
  means zeros. Norm gains are width.grow_tree's."""
  zero = np.zeros(x.shape[:0], bool)
  zero_mask, fresh_mask = zero, zero
  y = x
  for axis, name in enumerate(part.axes):
    amap = maps.get(name)
    if amap is None:
      continue
    y = jnp.take(y, np.maximum(amap.source, 0), axis=axis)
    side = side_of(part, name)
    if side == "read":
      y = y * _along(amap.read_scale, axis, x.ndim).astype(y.dtype)
    new = _along(amap.is_new, axis, x.ndim)
    if side == amap.zero_side:
      zero_mask = zero_mask | new
    else:
      fresh_mask = fresh_mask | new
  if np.any(fresh_mask):
    y = jnp.where(fresh_mask, jnp.zeros_like(y) if fresh is None else fresh.astype(y.dtype), y)
  if np.any(zero_mask):
    y = jnp.where(zero_mask, jnp.zeros_like(y), y)
  return y
