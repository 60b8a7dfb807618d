"""Held-out evaluation: loss and bits per byte (sampling is jaxlm.generate)."""

import dataclasses
import math

import numpy as np


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
