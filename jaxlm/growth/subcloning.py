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
from jaxlm.model.attention import xla_attention
from jaxlm.model.layers import apply_rope
from jaxlm.model.transformer import Decoder


def _captured(params, config: ModelConfig, tokens_BL):
  """Each block's output and the normed inputs of its attention and MLP."""
  _, state = Decoder(config).apply({"params": params}, tokens_BL, capture_intermediates=True,
                                   mutable=["intermediates"])
  return state["intermediates"]


def _head_outputs(attention, x_BLD, config: ModelConfig):
  """Every query head's attention output [B, L, H, K] (before the out projection)."""
  q = jnp.einsum("bld,dhk->blhk", x_BLD, attention["query"])
  k = jnp.einsum("bld,dgk->blgk", x_BLD, attention["key"])
  v = jnp.einsum("bld,dgk->blgk", x_BLD, attention["value"])
  if "query_bias" in attention:
    q, k, v = q + attention["query_bias"], k + attention["key_bias"], v + attention["value_bias"]
  positions = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
  scaling = config.rope_scaling_params
  q = apply_rope(q, positions, config.rope_theta, config.max_seq_len, scaling)
  k = apply_rope(k, positions, config.rope_theta, config.max_seq_len, scaling)
  return xla_attention(q, k, v, jnp.ones(x_BLD.shape[:2], jnp.int32))


def activation_stats(params, config: ModelConfig, batches) -> dict:
  """Mean |activation| over the tokens of `batches` (token id arrays [B, L]): the residual
  stream per dimension (summed over every block's output), each layer's MLP units and query
  heads (the norm of the head's output); and the stream's mean square per dimension."""
  totals, count = None, 0
  for tokens_BL in batches:
    caught = _captured(params, config, jnp.asarray(tokens_BL))
    stats = {"embed": 0.0, "energy": 0.0, "mlp": [], "heads": []}
    for l in range(config.num_layers):
      layer, seen = params[f"layer_{l}"], caught[f"layer_{l}"]
      stream = seen["__call__"][0]
      stats["embed"] += jnp.mean(jnp.abs(stream), axis=(0, 1))
      stats["energy"] += jnp.mean(stream * stream, axis=(0, 1))
      mlp_in = seen["mlp_norm"]["__call__"][0]
      gate = mlp_in @ layer["mlp"]["gate"]
      hidden = jax.nn.silu(gate) * (mlp_in @ layer["mlp"]["up"])
      stats["mlp"].append(jnp.mean(jnp.abs(hidden), axis=(0, 1)))
      heads = _head_outputs(layer["attention"], seen["attention_norm"]["__call__"][0], config)
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
  for field in ("vocab_size", "resolved_head_dim", "tie_embeddings", "attention_bias"):
    if getattr(small, field) != getattr(large, field):
      raise UserError(f"subcloning keeps {field} ({getattr(large, field)!r} -> "
                      f"{getattr(small, field)!r})")
  if large.num_heads // large.num_kv_heads != small.num_heads // small.num_kv_heads:
    raise UserError("subcloning keeps whole KV groups, so num_heads / num_kv_heads must stay "
                    f"{large.num_heads // large.num_kv_heads}")


def subclone(params, large: ModelConfig, small: ModelConfig, stats: dict):
  """The small model's params cut from the large model's (see the module docstring)."""
  check_subclone(large, small)
  dims = _top(stats["embed"], small.d_model)
  energy = np.asarray(stats["energy"])
  gain = np.float32(np.sqrt(energy[dims].sum() / energy.sum() * large.d_model / small.d_model))
  per_group = large.num_heads // large.num_kv_heads
  out = {"embed": {"embedding": params["embed"]["embedding"][:, dims]},
         "final_norm": {"scale": params["final_norm"]["scale"][dims] * gain}}
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"][dims]
  for new, old in enumerate(kept_layers(large.num_layers, small.num_layers)):
    layer = params[f"layer_{old}"]
    units = _top(stats["mlp"][old], small.mlp_dim)
    group_scores = np.asarray(stats["heads"][old]).reshape(-1, per_group).sum(axis=1)
    groups = _top(group_scores, small.num_kv_heads)
    heads = (groups[:, None] * per_group + np.arange(per_group)[None]).reshape(-1)
    attention = {
        "query": layer["attention"]["query"][dims][:, heads],
        "key": layer["attention"]["key"][dims][:, groups],
        "value": layer["attention"]["value"][dims][:, groups],
        "out": layer["attention"]["out"][heads][:, :, dims]}
    for name, index in (("query_bias", heads), ("key_bias", groups), ("value_bias", groups)):
      if name in layer["attention"]:
        attention[name] = layer["attention"][name][index]
    out[f"layer_{new}"] = {
        "attention_norm": {"scale": layer["attention_norm"]["scale"][dims] * gain},
        "attention": attention,
        "mlp_norm": {"scale": layer["mlp_norm"]["scale"][dims] * gain},
        "mlp": {"gate": layer["mlp"]["gate"][dims][:, units],
                "up": layer["mlp"]["up"][dims][:, units],
                "down": layer["mlp"]["down"][units][:, dims]}}
  return out
