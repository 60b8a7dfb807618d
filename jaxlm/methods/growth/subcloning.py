"""Weight subcloning (Samragh et al. 2312.09299): initialise a smaller model from a larger trained
one. Neurons are ranked by their mean activation magnitude on a few batches; the residual stream
keeps its most important dimensions with ONE permutation shared by every layer (so the blocks
still read and write the same coordinates); each layer keeps its most important MLP units and
KV groups (with their query heads); whole blocks are removed, keeping the first and last and
spacing the rest evenly (the paper finds middle blocks change the stream least).

    stats = activation_stats(params, config, batches)        # mean |activation| per neuron
    small = subclone(params, config, small_config, stats)

Rescaling: RMSNorm divides by the RMS over the kept dimensions, which carry a fraction f of the
stream's energy (f > D_small / D_large when the large dimensions are kept), so every norm gain is
multiplied by sqrt(f D_large / D_small), measured from the same batches: the normalised values of
the kept dimensions then match the large model's on average.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.model import ModelConfig
from jaxlm.model.anatomy import Anatomy, anatomy
from jaxlm.model.transformer import activations


def _sown(tree: dict, name: str, where: str):
  """The one value sown as `name` anywhere in a block's activations."""
  found = [v for path, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, tuple))[0] if str(path[-1].key) == name]
  if len(found) != 1:
    raise UserError(f"subcloning scores the block's {name!r} activations, but {where} sows "
                    f"{len(found)} of them; its modules must sow one ('activations', {name!r})")
  return found[0][0]


def activation_stats(params, config: ModelConfig, batches) -> dict:
  """Mean |activation| over the tokens of `batches` (token id arrays [B, L]): the residual
  stream per dimension (summed over every block's output), each layer's MLP units and query
  heads (the norm of the head's output); and the stream's mean square per dimension."""
  parts, totals, count = anatomy(config), None, 0
  for tokens_BL in batches:
    caught = activations(params, config, jnp.asarray(tokens_BL))
    stats = {"embed": 0.0, "energy": 0.0, "mlp": [], "heads": []}
    for l in range(config.num_layers):
      kind = "an MoE layer" if config.is_moe_block(l) else f"ModelConfig.mlp={config.mlp!r}"
      seen, where = caught[parts.block_key(l)], f"block {l} ({kind})"
      stream = _sown(seen, "stream", where)
      stats["embed"] += jnp.mean(jnp.abs(stream), axis=(0, 1))
      stats["energy"] += jnp.mean(stream * stream, axis=(0, 1))
      stats["mlp"].append(jnp.mean(jnp.abs(_sown(seen, "mlp", where)), axis=(0, 1)))
      heads = _sown(seen, "heads", where)
      stats["heads"].append(jnp.mean(jnp.linalg.norm(heads, axis=-1), axis=(0, 1)))
    stats = {k: np.asarray(jnp.stack(v) if isinstance(v, list) else v) for k, v in stats.items()}
    totals = stats if totals is None else {k: totals[k] + stats[k] for k in stats}
    count += 1
  if not count:
    raise UserError("activation_stats needs at least one batch")
  return {k: v / count for k, v in totals.items()}


def kept_layers(large: int, small: int) -> list[int]:
  """`small` of `large` blocks: the first, the last, and evenly spaced ones between."""
  return sorted(set(np.round(np.linspace(0, large - 1, small)).astype(int).tolist()))


def _top(scores, k: int) -> np.ndarray:
  """Indices of the k largest scores, in their original order."""
  return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:k])


def check_subclone(large: ModelConfig, small: ModelConfig) -> None:
  for field in ("d_model", "mlp_dim", "num_heads", "num_kv_heads", "num_layers"):
    if getattr(small, field) > getattr(large, field):
      raise UserError(f"subcloning makes a smaller model, but ModelConfig.{field} grows "
                      f"{getattr(large, field)} -> {getattr(small, field)}; use a growth "
                      "transition")
  for field in ("vocab_size", "resolved_head_dim", "tie_embeddings", "attention_bias", "mlp"):
    if getattr(small, field) != getattr(large, field):
      raise UserError(f"subcloning keeps {field} ({getattr(large, field)!r} -> "
                      f"{getattr(small, field)!r})")
  if large.num_heads // large.num_kv_heads != small.num_heads // small.num_kv_heads:
    raise UserError("subcloning keeps whole KV groups, so num_heads / num_kv_heads must stay "
                    f"{large.num_heads // large.num_kv_heads}")


def _cut(tree, key: str, parts: Anatomy, kept: dict, gain):
  """The param-shaped subtree at root `key`, every leaf indexed by `kept` ({axis: indices})
  along its axes, norm gains times `gain` (a block's leaves read from block 0's anatomy)."""
  def cut(path, leaf):
    part = parts[(key, *(str(k.key) for k in path))]
    for axis, name in enumerate(part.axes):
      if name in kept:
        leaf = jnp.take(leaf, kept[name], axis=axis)
    return leaf * gain if part.kind == "norm" else leaf
  return jax.tree_util.tree_map_with_path(cut, tree)


def subclone(params, large: ModelConfig, small: ModelConfig, stats: dict):
  """The small model's params cut from the large model's (see the module docstring)."""
  check_subclone(large, small)
  parts = anatomy(large)
  dims = _top(stats["embed"], small.d_model)
  energy = np.asarray(stats["energy"])
  gain = np.float32(np.sqrt(energy[dims].sum() / energy.sum() * large.d_model / small.d_model))
  per_group = large.num_heads // large.num_kv_heads
  out = {key: _cut(value, key, parts, {"embed": dims}, gain) for key, value in params.items()
         if parts.block_index(key) is None}
  for new, old in enumerate(kept_layers(large.num_layers, small.num_layers)):
    group_scores = np.asarray(stats["heads"][old]).reshape(-1, per_group).sum(axis=1)
    groups = _top(group_scores, small.num_kv_heads)
    kept = {"embed": dims, "mlp": _top(stats["mlp"][old], small.mlp_dim), "kv_heads": groups,
            "heads": (groups[:, None] * per_group + np.arange(per_group)[None]).reshape(-1)}
    out[parts.block_key(new)] = _cut(params[parts.block_key(old)], parts.block_key(0), parts,
                                     kept, gain)
  return out
