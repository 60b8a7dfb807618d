"""Which weights a sparsity method masks, and how a mask tree lines up with the params.

Masks are a pytree of bool arrays with the structure of the *selected* params only (by default
every attention and MLP matrix; embeddings, the head and norms stay dense unless a pattern
names them): {"layer_0/attention/query": bool[D, H, K], ...}, keyed by the param's name so a
checkpoint reads them back by name and they shard with their params (`mask_axes`).
"""

import re

import jax
import numpy as np

from jaxlm.errors import UserError
from jaxlm.tree_names import flatten_names

DEFAULT_PATTERNS = (r"layer_\d+/attention/(query|key|value|out)", r"layer_\d+/mlp/(gate|up|down)")

def select(params, patterns=DEFAULT_PATTERNS) -> dict:
  """{name: param} for the params whose name fully matches one of `patterns`; a pattern that
  matches nothing is one line naming it."""
  names = flatten_names(params)
  chosen = {}
  for pattern in patterns:
    regex = re.compile(pattern)
    hits = {n: p for n, p in names.items() if regex.fullmatch(n)}
    if not hits:
      raise UserError(f"sparsity pattern {pattern!r} matches no parameter; names look like "
                      f"{sorted(names)[:3]} (use the 'layer_\\d+/mlp/up' form)")
    chosen.update(hits)
  return {n: chosen[n] for n in sorted(chosen)}


def get(params, name: str):
  node = params
  for key in name.split("/"):
    node = node[key]
  return node


def replace(params, values: dict):
  """`params` with the leaves named in `values` replaced."""
  def swap(path, leaf):
    name = "/".join(str(k.key) for k in path)
    return values.get(name, leaf)
  return jax.tree_util.tree_map_with_path(swap, params)


def mask_axes(param_axes, names) -> dict:
  """The masks' logical axes: each mask shards like its param."""
  return {name: get(param_axes, name) for name in names}


def input_axes(name: str) -> tuple[int, ...]:
  """Positions of the axes `name`'s weight reads (its input; N:M groups run along them): the
  attention output projection [heads, head_dim, embed] reads two, every other matrix
  ([embed, ...] or [mlp, embed]) its first."""
  return (0, 1) if name.endswith("attention/out") else (0,)


def sizes(masks: dict) -> dict[str, int]:
  return {name: int(np.prod(m.shape)) for name, m in masks.items()}
