"""The sampling plan: which row of which source is the k-th row of training, as a grain MapDataset.

Two pieces, both pure functions of k, so batch s is a pure function of s and resuming is exact:

  - per source, `MapDataset.range(num_rows).shuffle(seed).repeat()`: every row once per epoch, a
    fresh global order each epoch (grain's index shuffle: O(1) memory at any size);
  - across sources, `WeightedInterleave`, a grain DatasetSelectionMap: a deterministic
    low-discrepancy interleave with exact integer proportions, so after n rows every source has
    contributed w * n rows to within a row or two (exact in expectation, and nearly exact at
    every prefix, which a per-row coin flip is not).

Importing grain imports jax; the rest of the data package does not need either.
"""

import dataclasses
import difflib
import functools
import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from fractions import Fraction

import grain
import numpy as np

from jaxlm.errors import UserError

_RESOLUTION = 1 << 20  # Weights are exact to at least one part in a million.


def normalize_weights(weights: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
  """Checks a {source name: weight} mixture and returns it over `names`, summing to 1.

  Sources left out of the mixture get weight 0: they are evaluated but not trained on.
  """
  if not isinstance(weights, Mapping):
    raise UserError(f"DataConfig.mixture must map source names to weights, e.g. "
                    f"{{'{names[0]}': 1.0}}; got {weights!r}")
  for name, weight in weights.items():
    if name not in names:
      close = difflib.get_close_matches(str(name), names, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise UserError(f"DataConfig.mixture names {name!r}, which is not a source (sources: "
                      f"{list(names)}){hint}")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
      raise UserError(f"DataConfig.mixture weight of {name!r} is {weight!r}; weights must be "
                      "finite and >= 0")
  total = float(sum(weights.values()))
  if total <= 0:
    raise UserError(f"DataConfig.mixture weights sum to 0 ({dict(weights)}); give at least one "
                    "source a positive weight")
  return {name: float(weights.get(name, 0.0)) / total for name in names}


def integer_proportions(weights: Sequence[float]) -> tuple[int, ...]:
  """Positive weights -> the smallest integers in the same ratio: exact for ratios of small
  integers (0.95 / 0.05 -> 19 : 1, thirds -> 1 : 1 : 1), else to one part in 2^20."""
  total = math.fsum(weights)
  fractions = [Fraction(w / total).limit_denominator(_RESOLUTION) for w in weights]
  denominator = functools.reduce(math.lcm, (f.denominator for f in fractions))
  if denominator <= _RESOLUTION:
    counts = [f.numerator * (denominator // f.denominator) for f in fractions]
  else:  # Largest-remainder rounding, so that no weight is lost to truncation.
    scaled = np.asarray(weights, np.float64) / total * _RESOLUTION
    floors = np.floor(scaled).astype(np.int64)
    by_remainder = np.argsort(-(scaled - floors), kind="stable")
    floors[by_remainder[:_RESOLUTION - int(floors.sum())]] += 1
    counts = floors.tolist()
  counts = [max(int(c), 1) for c in counts]  # A tiny positive weight still gets rows.
  divisor = functools.reduce(math.gcd, counts)
  return tuple(c // divisor for c in counts)


class WeightedInterleave(grain.transforms.DatasetSelectionMap):
  """Global index k -> (component, index within component), for infinite components.

  grain's own mixing rule (`MapDataset.mix`): component 0 takes ceil(k * p0 / P) of the first k
  indices, component 1 the same share of the rest, and so on. Ours differs only in deriving the
  integer proportions to 2^-20 instead of truncating them at 100x the smallest weight.
  """

  def __init__(self, weights: Sequence[float]):
    self.proportions = integer_proportions(weights)

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    components, indices = self.select(np.array([index], np.int64))
    return int(components[0]), int(indices[0])

  def select(self, k_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised __getitem__: (component, index within component) for each k."""
    k_N = np.asarray(k_N, np.int64)
    remaining = sum(self.proportions)
    if k_N.size and int(k_N.max()) >= np.iinfo(np.int64).max // (remaining + 1):
      raise OverflowError("row index too large for the mixture")
    component_N = np.full(k_N.shape, -1, np.int64)
    index_N = np.zeros(k_N.shape, np.int64)
    current_k, current_k1 = k_N.copy(), k_N + 1
    for i, p in enumerate(self.proportions):
      next_k = current_k * (remaining - p) // remaining
      next_k1 = current_k1 * (remaining - p) // remaining
      taken_k1 = current_k1 - next_k1  # How many of the first k + 1 component i takes.
      hit = (component_N < 0) & ((current_k - next_k) != taken_k1)
      component_N[hit], index_N[hit] = i, taken_k1[hit] - 1
      remaining -= p
      current_k, current_k1 = next_k, next_k1
    return component_N, index_N

  def counts(self, num: int) -> np.ndarray:
    """How many of the first `num` indices each component takes, int64 [C]."""
    counts, current, remaining = [], int(num), sum(self.proportions)
    for p in self.proportions:
      following = current * (remaining - p) // remaining
      counts.append(current - following)
      current, remaining = following, remaining - p
    return np.array(counts, np.int64)


def derived_seed(seed: int, *keys: str, bits: int = 32) -> int:
  """A seed for one purpose of one source: keyed by name, so adding a source to a mixture leaves
  every other source's order unchanged."""
  digest = hashlib.blake2b("/".join([str(seed), *keys]).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % (1 << bits)


def _tag(component: int, row: int) -> tuple[int, int]:
  return component, row


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Element k of `dataset` is (component, row) for the k-th training row."""
  dataset: grain.MapDataset
  selection: WeightedInterleave

  def select(self, k_N: np.ndarray) -> np.ndarray:
    """Vectorised components of rows k (for proportions; no row lookup)."""
    return self.selection.select(k_N)[0]


def sampling_plan(num_rows: Sequence[int], weights: Sequence[float], seeds: Sequence[int],
                  start_rows: Sequence[int]) -> SamplingPlan:
  """A plan over components with positive weights; `start_rows[i]` rows of component i are
  skipped (already drawn by an earlier stage)."""
  components = []
  for i, (rows, seed, start) in enumerate(zip(num_rows, seeds, start_rows)):
    rows_ds = grain.MapDataset.range(rows).shuffle(seed=seed).repeat()
    if start:
      rows_ds = rows_ds.slice(slice(start, None))
    components.append(rows_ds.map(functools.partial(_tag, i)))
  selection = WeightedInterleave(weights)
  return SamplingPlan(grain.MapDataset.select_from_datasets(components, selection), selection)
