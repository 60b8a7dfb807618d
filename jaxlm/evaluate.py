"""Held-out evaluation (loss and bits per byte) and sampling from a trained model."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model import ModelConfig, forward
from jaxlm.model.cross_entropy import head_cross_entropy
from jaxlm.model.transformer import features


def token_losses(params, cfg: ModelConfig, batch):
  """Per-target cross-entropy in nats [B, L] (unweighted). The output head is fused with the
  loss (model/cross_entropy.py): no [B, L, V] logits are kept, and the gradient is cheapest for
  a loss of the form sum(ce * batch["weights"]), as training takes it."""
  x_BLD, w_DV = features(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
  b, l, d = x_BLD.shape
  weights_N = batch["weights"].reshape(-1) if "weights" in batch else jnp.ones((b * l,))
  ce_N = head_cross_entropy(x_BLD.reshape(b * l, d), w_DV, batch["targets"].reshape(-1),
                            weights_N, cfg.compute_dtype)
  return ce_N.reshape(b, l)


def evaluate(eval_step, params, batches, byte_lengths: np.ndarray,
             to_device=lambda batch: batch) -> dict[str, float]:
  """Mean loss per target token, and bits per byte of the target text.

  `eval_step(params, batch) -> (summed nats, number of targets)`; `to_device` places a host
  batch on the mesh. `byte_lengths[token_id]` is the number of UTF-8 bytes that token stands for
  (0 for specials), so bits per byte compares models with different tokenizers.
  """
  sums = [eval_step(params, to_device(batch)) for batch in batches]  # Dispatch all, sync once.
  total_nats = sum(float(s) for s, _ in sums)
  total_targets = sum(float(n) for _, n in sums)
  total_bytes = sum(float(np.sum(byte_lengths[b["targets"]] * b["weights"])) for b in batches)
  return {
      "eval/loss": total_nats / max(total_targets, 1.0),
      "eval/bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1.0),
      "eval/targets": total_targets,
      "eval/bytes": total_bytes,
  }


def generate(params, cfg: ModelConfig, prompt_ids, num_tokens: int, rng, temperature: float = 0.8):
  """Sample `num_tokens` after `prompt_ids`. Re-runs the model on a fixed-size window each step
  (no KV cache): simple, jit-friendly, and fast enough for the small models of a sample print."""
  prompt = np.asarray(prompt_ids, np.int32)
  window = min(cfg.max_seq_len, len(prompt) + num_tokens)
  prompt = prompt[-(window - 1):] if len(prompt) >= window else prompt
  buffer = jnp.zeros((1, window), jnp.int32).at[0, :len(prompt)].set(prompt)

  @jax.jit
  def sample(params, buffer, rng):  # params as an argument: never baked in as constants.
    def step(i, carry):
      buffer, rng = carry
      rng, key = jax.random.split(rng)
      logits = forward(params, cfg, buffer)[0, i - 1]
      token = jax.random.categorical(key, logits / max(temperature, 1e-6))
      return buffer.at[0, i].set(token), rng
    return jax.lax.fori_loop(len(prompt), window, step, (buffer, rng))[0]

  return np.asarray(sample(params, buffer, rng))[0, len(prompt):]
