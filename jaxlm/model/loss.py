"""The training loss: per-target cross-entropy with the output head fused into it."""

import jax.numpy as jnp

from jaxlm.model.config import ModelConfig
from jaxlm.model.cross_entropy import head_cross_entropy
from jaxlm.model.transformer import features, features_and_losses


def _cross_entropy(x_BLD, w_DV, cfg: ModelConfig, batch):
  b, l, d = x_BLD.shape
  weights_N = batch["weights"].reshape(-1) if "weights" in batch else jnp.ones((b * l,))
  ce_N = head_cross_entropy(x_BLD.reshape(b * l, d), w_DV, batch["targets"].reshape(-1),
                            weights_N, cfg.compute_dtype)
  return ce_N.reshape(b, l)


def training_losses(params, cfg: ModelConfig, batch, with_intermediates: bool = False):
  """(per-target cross-entropy [B, L], ModelExtras: the model's own auxiliary losses, its
  metrics, and what it sowed into "intermediates" or None): what the train step minimises. A
  dense model has none; an MoE layer's balancing losses and expert load are its own."""
  (x_BLD, w_DV), extras = features_and_losses(
      params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"], with_intermediates)
  return _cross_entropy(x_BLD, w_DV, cfg, batch), extras


def token_losses(params, cfg: ModelConfig, batch, with_intermediates: bool = False):
  """Per-target cross-entropy in nats [B, L] (unweighted). The output head is fused with the
  loss (cross_entropy.py): no [B, L, V] logits are kept, and the gradient is cheapest for a loss
  of the form sum(ce * batch["weights"]), as training takes it. With `with_intermediates`,
  returns (ce, what the model sowed into flax's "intermediates" collection) for methods' aux
  losses (methods/hooks.py)."""
  out = features(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"],
                 with_intermediates=with_intermediates)
  (x_BLD, w_DV), intermediates = out if with_intermediates else (out, None)
  ce_BL = _cross_entropy(x_BLD, w_DV, cfg, batch)
  return (ce_BL, intermediates) if with_intermediates else ce_BL
