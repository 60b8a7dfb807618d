"""The Llama-style decoder, and the functional API the rest of jaxlm uses:

    params = init_params(config, rng)             # a plain pytree of float32 arrays
    logits_BLV = forward(params, config, tokens_BL, positions_BL, segment_ids_BL)
    x_BLD, w_DV = features(params, config, tokens_BL)   # for a loss that applies the head
    axes = logical_axes(config)                   # same tree, leaves are logical PartitionSpecs

and for decoding with a KV cache (jaxlm/generate.py samples with it):

    cache = init_cache(config, batch, max_len)    # empty: max_len slots per row
    logits_BV, cache = prefill(params, config, cache, prompt_BP, positions_BP, segment_ids_BP)
    logits_BV, cache = decode_step(params, config, cache, tokens_B1, positions_B1)
"""

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model.attention import Attention, CacheSlots, uninitialized_cache
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import Embed, RMSNorm, Role, mlp_kind, param_with_axes
from jaxlm.model.moe import MoEMLP

_REMAT_POLICY = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def block_mlp(config: ModelConfig, index: int) -> type:
  """Block `index`'s MLP module: an MoE layer where ModelConfig.moe_layers says so, else the
  kind ModelConfig.mlp names."""
  return MoEMLP if config.is_moe_block(index) else mlp_kind(config)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is
  `block_mlp(config, index)`."""
  config: ModelConfig
  index: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache_slots: CacheSlots | None = None):
    x_BLD = x_BLD + Attention(self.config, name="attention")(
        RMSNorm(self.config, name="attention_norm")(x_BLD), positions_BL, segment_ids_BL,
        cache_slots)
    mlp = block_mlp(self.config, self.index)(self.config, name="mlp")
    x_BLD = x_BLD + mlp(RMSNorm(self.config, name="mlp_norm")(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
    self.sow("activations", "stream", x_BLD)  # The residual stream after the block.
    return x_BLD


class Decoder(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32)."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"lm_head": Role("head", reads=("embed",))}

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, features_only=False,
               decode: str | None = None):
    """With `features_only`, returns (final normed hidden states x_BLD, output head w_DV)
    instead of the logits, so a fused loss can apply the head itself (cross_entropy.py).

    With `decode` ("prefill" into an empty cache, or "step"; apply with mutable=["cache"]), the
    tokens are the next chunk of the sequences held in the 'cache' collection (`init_cache`):
    their keys and values, and segment ids, are written at the cache's `index`, which then
    advances by L. The caller keeps index + L within the cache (an update past its end would be
    clamped onto the last slots) and gives the chunk's true positions (RoPE)."""
    cfg = self.config
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    block = Block
    if cfg.remat != "none" and decode is None:  # Decoding never differentiates.
      block = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=True)
    extra = ()
    if decode is not None:
      if decode not in ("prefill", "step"):
        raise ValueError(f"decode={decode!r}; use 'prefill' or 'step'")
      index = self.variable("cache", "index", uninitialized_cache)
      segments = self.variable("cache", "segment_ids", uninitialized_cache)
      segments.value = jax.lax.dynamic_update_slice(
          segments.value, segment_ids_BL.astype(segments.value.dtype), (0, index.value))
      extra = (CacheSlots(index.value, segments.value, prefill=decode == "prefill"),)
      index.value = index.value + tokens_BL.shape[1]

    embed = Embed(cfg, name="embed")
    x_BLD = embed(tokens_BL)
    for i in range(cfg.num_layers):
      x_BLD = block(cfg, i, name=f"layer_{i}")(x_BLD, positions_BL, segment_ids_BL, *extra)
    x_BLD = RMSNorm(cfg, name="final_norm")(x_BLD)
    if cfg.tie_embeddings:
      w_DV = embed.embedding_VD.T
    else:
      w_DV = param_with_axes(self, "lm_head", nn.initializers.normal(cfg.init_std),
                             (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
    if features_only:
      return x_BLD, w_DV
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, w_DV.astype(x_BLD.dtype))
    logits_BLV = nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))
    return logits_BLV.astype(jnp.float32)


def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def init_params(config: ModelConfig, rng):
  """Fresh parameters as a plain pytree (the logical-axis boxes are stripped)."""
  boxed = Decoder(config).init(rng, _dummy_tokens())["params"]
  return nn.unbox(boxed)


def logical_axes(config: ModelConfig):
  """The params tree with each leaf replaced by its logical PartitionSpec (no compute)."""
  boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), _dummy_tokens()))
  return nn.get_partition_spec(boxed["params"])


def forward(params, config: ModelConfig, tokens_BL, positions_BL=None, segment_ids_BL=None):
  return Decoder(config).apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL)


def activations(params, config: ModelConfig, tokens_BL) -> dict:
  """What each block sows under "activations" ({"layer_0": {"stream": (x_BLD,), "attention":
  {"heads": (out_BLHK,)}, "mlp": {"mlp": (h_BLF,)}}, ...}): the residual stream after the block,
  every head's output and the MLP's hidden units (sow does not cross nn.remat: run without)."""
  plain = dataclasses.replace(config, remat="none")
  _, collections = Decoder(plain).apply({"params": params}, tokens_BL, mutable=["activations"])
  return collections["activations"]


def features(params, config: ModelConfig, tokens_BL, positions_BL=None, segment_ids_BL=None,
             with_intermediates: bool = False):
  """(final hidden states x_BLD, output head w_DV): `forward` without its last matmul. With
  `with_intermediates`: ((x_BLD, w_DV), the values modules sowed into "intermediates")."""
  decoder = Decoder(config)
  if not with_intermediates:
    return decoder.apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL,
                         features_only=True)
  out, collections = decoder.apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL,
                                   features_only=True, mutable=["intermediates"])
  return out, collections.get("intermediates", {})


class ModelExtras(NamedTuple):
  """What a training forward pass yields besides the features: the model's own auxiliary losses
  {name: weighted scalar}, summed over layers; its metrics {"layer_1/mlp/expert_load": array}
  (stop-gradient, logged); and what it sowed into "intermediates" (None unless asked)."""
  losses: dict
  metrics: dict
  intermediates: dict | None


def _sown_name(path) -> str:
  return "/".join(str(k.key) for k in path[:-1])  # sow keeps a tuple of values under each name.


def features_and_losses(params, config: ModelConfig, tokens_BL, positions_BL=None,
                        segment_ids_BL=None, with_intermediates: bool = False):
  """((x_BLD, w_DV), ModelExtras). A module adds a loss to training by sowing a weighted
  scalar (`self.sow("losses", "load_balancing", value)`; summed over the model's layers) and a
  metric by sowing under "metrics" (an MoE layer's expert load)."""
  mutable = ["losses", "metrics"] + (["intermediates"] if with_intermediates else [])
  out, collections = Decoder(config).apply({"params": params}, tokens_BL, positions_BL,
                                           segment_ids_BL, features_only=True, mutable=mutable)
  losses = {}
  for path, value in jax.tree_util.tree_flatten_with_path(collections.get("losses", {}))[0]:
    name = str(path[-2].key)
    losses[name] = losses.get(name, 0.0) + value
  metrics = {_sown_name(path): jax.lax.stop_gradient(value) for path, value in
             jax.tree_util.tree_flatten_with_path(collections.get("metrics", {}))[0]}
  intermediates = collections.get("intermediates", {}) if with_intermediates else None
  return out, ModelExtras(losses, metrics, intermediates)


def init_cache(config: ModelConfig, batch: int, max_len: int):
  """An empty KV cache of `max_len` slots per row for `prefill` and `decode_step`: the 'cache'
  collection of the Decoder, a plain pytree. Keys and values are kept in the compute dtype:
  2 * num_layers * batch * max_len * num_kv_heads * head_dim numbers."""
  if max_len > config.max_seq_len:
    raise ValueError(f"a cache of {max_len} slots exceeds max_seq_len={config.max_seq_len}")
  shape = (batch, config.num_kv_heads, max_len, config.resolved_head_dim)
  layer = lambda: {"attention": {"key": jnp.zeros(shape, config.compute_dtype),
                                 "value": jnp.zeros(shape, config.compute_dtype)}}
  return {"index": jnp.zeros((), jnp.int32),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
          **{f"layer_{i}": layer() for i in range(config.num_layers)}}


def _decode(params, config, cache, mode, tokens_BL, positions_BL, segment_ids_BL):
  (x_BLD, w_DV), variables = Decoder(config).apply(
      {"params": params, "cache": cache}, tokens_BL, positions_BL, segment_ids_BL,
      features_only=True, decode=mode, mutable=["cache"])
  logits_BV = jnp.einsum("bd,dv->bv", x_BLD[:, -1], w_DV.astype(x_BLD.dtype))
  logits_BV = nn.with_logical_constraint(logits_BV, ("batch", "vocab"))
  return logits_BV.astype(jnp.float32), variables["cache"]


def prefill(params, config: ModelConfig, cache, tokens_BL, positions_BL=None, segment_ids_BL=None):
  """Run a prompt chunk into an empty cache (from `init_cache`), attending within the chunk with
  the configured attention implementation. Returns (next-token logits after the chunk's last
  position [B, V] float32, the filled cache). Padding: segment id 0 (left padding keeps every
  row's last prompt token in the last column)."""
  return _decode(params, config, cache, "prefill", tokens_BL, positions_BL, segment_ids_BL)


def decode_step(params, config: ModelConfig, cache, tokens_BL, positions_BL, segment_ids_BL=None):
  """Append tokens_BL (usually one per row, [B, 1]) at the cache's next slots, at sequence
  positions `positions_BL`, attending to every slot written so far. Costs L positions, not the
  window. Segment ids default to 1 (a prompt of one document, as `jaxlm.generate` lays it out).
  Returns (logits after the chunk's last token [B, V] float32, the updated cache)."""
  return _decode(params, config, cache, "step", tokens_BL, positions_BL, segment_ids_BL)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
