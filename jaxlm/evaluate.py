"""Held-out evaluation (loss and bits per byte) and sampling from a trained model."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model import ModelConfig, forward


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One domain's validation batches, placed on the devices once (they stay there between
  evaluations), and the number of UTF-8 bytes their targets stand for."""
  batches: list
  num_bytes: float


def place_eval_sets(host_sets: dict, byte_lengths: np.ndarray, to_device) -> dict[str, EvalSet]:
  """{domain: host batches} -> {domain: EvalSet}. `byte_lengths[token_id]` is the number of
  UTF-8 bytes the token stands for (0 for specials), so bits per byte compares tokenizers."""
  return {domain: EvalSet([to_device(b) for b in batches],
                          sum(float(np.sum(byte_lengths[b["targets"]] * b["weights"]))
                              for b in batches))
          for domain, batches in host_sets.items()}


def evaluate(eval_step, params, eval_sets: dict[str, EvalSet]) -> dict[str, float]:
  """Mean loss per target token and bits per byte of the target text on each domain, and over
  all of them (eval/loss, eval/bits_per_byte). `eval_step(params, batch) -> (summed nats,
  number of targets)`."""
  sums = {domain: [eval_step(params, batch) for batch in s.batches]  # Dispatch all, sync once.
          for domain, s in eval_sets.items()}
  results, nats, targets, num_bytes = {}, 0.0, 0.0, 0.0
  for domain, domain_sums in sums.items():
    domain_nats = sum(float(n) for n, _ in domain_sums)
    domain_targets = sum(float(t) for _, t in domain_sums)
    domain_bytes = eval_sets[domain].num_bytes
    results[f"eval/{domain}/loss"] = domain_nats / max(domain_targets, 1.0)
    results[f"eval/{domain}/bits_per_byte"] = domain_nats / math.log(2) / max(domain_bytes, 1.0)
    nats, targets, num_bytes = nats + domain_nats, targets + domain_targets, num_bytes + domain_bytes
  results.update({"eval/loss": nats / max(targets, 1.0),
                  "eval/bits_per_byte": nats / math.log(2) / max(num_bytes, 1.0),
                  "eval/targets": targets})
  return results


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
