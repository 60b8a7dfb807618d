"""Which weights a sparsity method masks, and how a mask tree lines up with the params.

Masks are a pytree of bool arrays with the structure of the *selected* params only (by default
every matrix of the blocks, as the model's anatomy lists them: attention and MLP, whatever the
MLP's kind; embeddings, the head and norms stay dense unless a pattern names them):
{"layer_0/attention/query": bool[D, H, K], ...}, keyed by the param's name so a checkpoint reads
them back by name and they shard with their params (`mask_axes`).
"""

import re

import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.anatomy import Anatomy
from jaxlm.tree_names import flatten_names, get_named


def select(params, parts: Anatomy, patterns=None) -> dict:
  """{name: param} for the params whose name fully matches one of `patterns` (None: the
  anatomy's block matrices), in name order; a pattern that matches nothing is one line naming
  it."""
  names = flatten_names(params)
  if patterns is None:
    return {p.name: names[p.name] for p in sorted(parts.block_matmuls, key=lambda p: p.name)}
  chosen = {}
  for pattern in patterns:
    regex = re.compile(pattern)
    hits = {n: p for n, p in names.items() if regex.fullmatch(n)}
    if not hits:
      raise UserError(f"sparsity pattern {pattern!r} matches no parameter; names look like "
                      f"{sorted(names)[:3]}")
    chosen.update(hits)
  return {n: chosen[n] for n in sorted(chosen)}


def mask_axes(param_axes, names) -> dict:
  """The masks' logical axes: each mask shards like its param."""
  return {name: get_named(param_axes, name) for name in names}


def input_axes(parts: Anatomy, name: str) -> tuple[int, ...]:
  """Positions of the axes `name`'s weight reads (its input, as the anatomy declares; N:M
  groups run along them): e.g. the attention output projection [heads, head_dim, embed] reads
  two."""
  return parts[name].input_dims


def sizes(masks: dict) -> dict[str, int]:
  return {name: int(np.prod(m.shape)) for name, m in masks.items()}
