"""Depth growth: which small layer each layer of the deeper model copies.

    layers = depth_sources(small_layers=6, large_layers=24, order="stack")   # [0..5] x 4
    params = grow_depth(params, layers, anatomy(config), zero_copies=False)

- order="stack": layer l copies layer l mod L, the whole stack repeated (G_stack, Du et al.
  2405.15319, "Stacking Your Transformers"; StackBERT, Gong et al. 2019). Needs L_new a
  multiple of L: G_stack's growth factor g is a whole number.
- order="interleave": each layer repeated in place, layer l copies floor(l * L / L_new) (bert2BERT
  "inner" stacking / interpolation, 112233; any L_new >= L).
- zero_copies=True: every repeated layer after its source's first copy has zero output
  projections (attention `out`, MLP `down`), so it adds nothing to the residual stream: exact
  identity insertion (the function is the small model's; the copies still train, since their
  inputs and the gradients into their zeroed projections are not zero). Needs the same
  norm_eps in both models (the grow_depth transition checks it).
Embeddings, the final norm and the head are kept as they are (copied, for G_stack).
"""

from jaxlm.errors import UserError
from jaxlm.model.anatomy import Anatomy

ORDERS = ("stack", "interleave")


def depth_sources(small_layers: int, large_layers: int, order: str = "stack") -> list[int]:
  """The small layer each of the `large_layers` layers copies."""
  if order not in ORDERS:
    raise UserError(f"grow_depth.order={order!r}; choose one of {list(ORDERS)}")
  if large_layers < small_layers:
    raise UserError(f"depth growth cannot shrink num_layers {small_layers} -> {large_layers}; "
                    "to make a smaller model use weight subcloning (tools/subclone.py)")
  if order == "stack":
    if large_layers % small_layers:
      raise UserError(f"stacking repeats the whole stack: num_layers {large_layers} is not a "
                      f"multiple of {small_layers}; use order='interleave' for other depths")
    return [l % small_layers for l in range(large_layers)]
  return [l * small_layers // large_layers for l in range(large_layers)]


def _zeroed(block, writers):
  """`block` with the leaves at `writers` (paths inside the block) multiplied by zero."""
  block = dict(block)
  for path in writers:
    head, *rest = path
    block[head] = _zeroed(block[head], [tuple(rest)]) if rest else block[head] * 0
  return block


def grow_depth(tree, sources: list[int], parts: Anatomy, zero_copies: bool = False):
  """A params-shaped `tree` (params or an optimizer moment) of a model of `parts`' kind, with
  block l copying block sources[l]; with `zero_copies`, repeats after a source's first copy
  have their residual writers (the anatomy's attention out and MLP down) zero."""
  out = {k: v for k, v in tree.items() if parts.block_index(k) is None}
  writers = [part.path[1:] for part in parts.residual_writers(0)]
  seen = set()
  for l, source in enumerate(sources):
    block = tree[parts.block_key(source)]
    if zero_copies and source in seen:
      block = _zeroed(block, writers)
    seen.add(source)
    out[parts.block_key(l)] = block
  return out
