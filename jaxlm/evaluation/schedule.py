"""What a run evaluates, and when: the run-level evaluation config.

    run.evaluation = @EvalConfig()
    EvalConfig.every = 200
    EvalConfig.domains = [@pretrain_text/text_files()]   # also evaluated in every later stage
    EvalConfig.near_start_every = 10                     # the stability gap: dense evaluation
    EvalConfig.near_start_steps = 100                    # over each stage's first 100 steps

Every stage evaluates its own sources (weight-0 ones included) plus `domains`, each tokenized
with that stage's tokenizer. With `baseline` (the default) each stage is evaluated once before
its first update, and every later evaluation in a stage that follows another (or starts from
another run) logs forgetting/<domain> = loss minus that baseline (positive: forgotten); a first
stage has learnt nothing to forget. Continual-pretraining papers plot it this way (Ibrahim et al.
2024, 2403.08763; the stability gap, Guo et al. 2024, 2406.14833).
"""

import dataclasses
from typing import Any, Sequence

import gin

from jaxlm.validation import check_field_types, check_range


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 200  # Steps between evaluations; the end of every stage is always evaluated.
  domains: Sequence[Any] = ()  # Sources evaluated in every stage besides the stage's own.
  near_start_every: int | None = None  # A denser cadence over each stage's first steps ...
  near_start_steps: int = 0  # ... this many of them.
  baseline: bool = True  # Evaluate before each stage's first update; log forgetting/<domain>.

  def __post_init__(self):
    check_field_types(self)
    check_range("EvalConfig.every", self.every, low=1, integer=True)
    check_range("EvalConfig.near_start_every", self.near_start_every, low=1, integer=True,
                optional=True)
    check_range("EvalConfig.near_start_steps", self.near_start_steps, low=0, integer=True)
    object.__setattr__(self, "domains", tuple(self.domains))

  def due(self, stage_step: int, stage_steps: int) -> bool:
    """Whether to evaluate after `stage_step` (1-based: updates done) of a stage's steps."""
    if stage_step == stage_steps or stage_step % self.every == 0:
      return True
    return bool(self.near_start_every and stage_step <= self.near_start_steps
                and stage_step % self.near_start_every == 0)


def forgetting(results: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
  """forgetting/<domain> = eval loss minus the stage's baseline loss, for every domain both
  have (and forgetting/all over all domains)."""
  out = {}
  for key, value in results.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "eval" and parts[2] == "loss" and key in baseline:
      out[f"forgetting/{parts[1]}"] = value - baseline[key]
  if "eval/loss" in results and "eval/loss" in baseline:
    out["forgetting/all"] = results["eval/loss"] - baseline["eval/loss"]
  return out
