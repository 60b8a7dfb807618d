"""The Llama-style decoder, and the functional API the rest of jaxlm uses:

    params = init_params(config, rng)             # a plain pytree of float32 arrays
    logits_BLV = forward(params, config, tokens_BL, positions_BL, segment_ids_BL)
    x_BLD, w_DV = features(params, config, tokens_BL)   # for a loss that applies the head
    axes = logical_axes(config)                   # same tree, leaves are logical PartitionSpecs
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model.attention import Attention
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import Embed, RMSNorm, SwiGLU, param_with_axes

_REMAT_POLICY = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    x_BLD = x_BLD + Attention(self.config, name="attention")(
        RMSNorm(self.config, name="attention_norm")(x_BLD), positions_BL, segment_ids_BL)
    x_BLD = x_BLD + SwiGLU(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x_BLD))
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


class Decoder(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, features_only=False):
    """With `features_only`, returns (final normed hidden states x_BLD, output head w_DV)
    instead of the logits, so a fused loss can apply the head itself (cross_entropy.py)."""
    cfg = self.config
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=True)

    embed = Embed(cfg, name="embed")
    x_BLD = embed(tokens_BL)
    for i in range(cfg.num_layers):
      x_BLD = block(cfg, name=f"layer_{i}")(x_BLD, positions_BL, segment_ids_BL)
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


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
