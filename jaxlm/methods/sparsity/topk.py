"""Masks that keep the largest scores, built so that a sharded matrix is never gathered.

`topk_mask` finds the k-th largest score exactly by bisection on its float32 bit pattern (for
non-negative floats the bits order like the values): 31 rounds of "how many scores are at least
this?", each a sum, which XLA computes per shard and all-reduces as one scalar. The mask then
keeps every score above the threshold and, among scores equal to it, the first ones in flat
order until exactly k are kept (a prefix count, needed only when there are ties). Exact: the
same mask a full sort would give (up to which of equal scores are kept), with k entries exactly.
jaxpruner's full-tensor argsort would instead gather the whole matrix on each device.

`nm_mask` keeps the N largest of every M consecutive weights along the input dimension (2:4 for
sparse tensor cores): groups never cross a shard of the input axis when M divides the shard, so
it is local to each shard.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError

_INF_BITS = 0x7F800000


def topk_mask(scores, k, eligible=None):
  """bool mask of the `k` largest non-negative `scores` (among `eligible` ones)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  eligible = jnp.ones(scores.shape, bool) if eligible is None else eligible
  count_at_least = lambda t: jnp.sum((bits >= t) & eligible)

  def halve(_, bounds):  # Invariant: count(>= lo) >= k; count(>= hi + 1) < k.
    lo, hi = bounds
    mid = lo + (hi - lo + 1) // 2
    ok = count_at_least(mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(_INF_BITS)))
  above = (bits > lo) & eligible
  ties = (bits == lo) & eligible
  need = k - jnp.sum(above)

  def first_ties():
    flat = ties.reshape(-1)
    return (flat & (jnp.cumsum(flat) <= need)).reshape(ties.shape)

  return above | jax.lax.cond(jnp.sum(ties) <= need, lambda: ties, first_ties)


def check_nm(name: str, n: int, m: int, input_size: int) -> None:
  if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1 or n > m:
    raise UserError(f"N:M sparsity needs whole numbers 1 <= N <= M, got N={n}, M={m}")
  if input_size % m:
    raise UserError(f"N:M sparsity: M={m} does not divide the input dimension {input_size} of "
                    f"{name!r}; choose M dividing it")


def nm_mask(weight, n: int, m: int, inputs: tuple[int, ...]):
  """bool mask keeping the N largest |w| in each group of M consecutive weights along the input
  axes `inputs` (flattened in order); ties go to the lower index."""
  order = list(inputs) + [i for i in range(weight.ndim) if i not in inputs]
  moved = jnp.transpose(weight, order)
  in_size = int(np.prod(moved.shape[:len(inputs)]))
  groups = jnp.abs(moved.reshape(in_size // m, m, -1))
  # Rank of each weight in its group by M^2 comparisons (cheaper than sorting for small M):
  # how many others are larger, or equal and earlier.
  mine, other = groups[:, :, None, :], groups[:, None, :, :]
  earlier = (np.arange(m)[None, :] < np.arange(m)[:, None])[None, :, :, None]
  rank = jnp.sum((other > mine) | ((other == mine) & earlier), axis=2)
  keep = (rank < n).reshape(moved.shape)
  return jnp.transpose(keep, np.argsort(order))


def as_matrix_shape(shape, inputs: tuple[int, ...]) -> tuple[int, int]:
  """(n_in, n_out) of a weight seen as a matrix from its input axes to the rest."""
  n_in = int(np.prod([shape[i] for i in inputs]))
  return n_in, int(np.prod(shape)) // n_in
