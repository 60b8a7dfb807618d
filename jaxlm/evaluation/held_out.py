"""Held-out evaluation: loss and bits per byte with their standard errors (sampling is
jaxlm.generate).

Each domain's eval set holds the batches of the final evaluation (DataConfig.final_eval_batches);
every evaluation reports the first DataConfig.max_eval_batches of them as eval/... (a fixed
subset, so the curve points compare), and the final one of each stage reports all of them as
eval_final/... as well. The standard error of a loss is over batches: the loss is a ratio of
summed nats to summed targets, so its error is the ratio estimator's (delta method),
sqrt(B / (B - 1) * sum_i (n_i - L t_i)^2) / sum_i t_i for B batches with n_i nats over t_i targets.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One domain's validation batches, placed on the devices once (they stay there between
  evaluations), the number of UTF-8 bytes each batch's targets stand for, and how many of the
  batches the intermediate evaluations read (None: all)."""
  batches: list
  batch_bytes: list[float]
  subset: int | None = None


def place_eval_sets(host_sets: dict, byte_lengths: np.ndarray, to_device,
                    subset: int | None = None) -> dict[str, EvalSet]:
  """{domain: host batches} -> {domain: EvalSet}. `byte_lengths[token_id]` is the number of
  UTF-8 bytes the token stands for (0 for specials), so bits per byte compares tokenizers.
  `subset`: the number of leading batches every evaluation reads (the final one reads all)."""
  return {domain: EvalSet([to_device(b) for b in batches],
                          [float(np.sum(byte_lengths[b["targets"]] * b["weights"]))
                           for b in batches], subset)
          for domain, batches in host_sets.items()}


def _summary(prefix: str, sums: list[tuple[float, float]], num_bytes: float) -> dict[str, float]:
  """Loss, bits per byte and their standard errors from per-batch (nats, targets)."""
  nats = np.array([n for n, _ in sums], np.float64)
  targets = np.array([t for _, t in sums], np.float64)
  total_targets = max(float(targets.sum()), 1.0)
  loss = float(nats.sum()) / total_targets
  bits_per_nat = total_targets / max(num_bytes, 1.0) / math.log(2)
  out = {f"{prefix}/loss": loss, f"{prefix}/bits_per_byte": loss * bits_per_nat}
  if len(sums) > 1:
    batches = len(sums)
    stderr = math.sqrt(batches / (batches - 1) * float(np.sum((nats - loss * targets) ** 2)))
    out[f"{prefix}/loss_stderr"] = stderr / total_targets
    out[f"{prefix}/bits_per_byte_stderr"] = stderr / total_targets * bits_per_nat
  return out


def evaluate(eval_step, params, eval_sets: dict[str, EvalSet],
             final: bool = False) -> dict[str, float]:
  """Mean loss per target token and bits per byte of the target text on each domain, and over
  all of them (eval/loss, eval/bits_per_byte), on each set's subset; with `final` also on every
  batch (eval_final/...). `eval_step(params, batch) -> (summed nats, number of targets)`."""
  sums = {domain: [eval_step(params, batch) for batch in  # Dispatch all, sync once.
                   (s.batches if final else s.batches[:s.subset])]
          for domain, s in eval_sets.items()}
  sums = {domain: [(float(n), float(t)) for n, t in batches] for domain, batches in sums.items()}
  results = _report("eval", sums, eval_sets, lambda s: slice(s.subset))
  if final:
    results.update(_report("eval_final", sums, eval_sets, lambda s: slice(None)))
  return results


def _report(prefix: str, sums: dict, eval_sets: dict[str, EvalSet], part) -> dict[str, float]:
  """Each domain's and the pooled summary over the batches `part(eval set)` selects."""
  results, pooled, pooled_bytes = {}, [], 0.0
  for domain, s in eval_sets.items():
    domain_sums, domain_bytes = sums[domain][part(s)], sum(s.batch_bytes[part(s)])
    results.update(_summary(f"{prefix}/{domain}", domain_sums, domain_bytes))
    pooled, pooled_bytes = pooled + domain_sums, pooled_bytes + domain_bytes
  results.update(_summary(prefix, pooled, pooled_bytes))
  results[f"{prefix}/targets"] = sum(t for _, t in pooled)
  return results
