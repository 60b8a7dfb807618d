"""Packed rows -> model batches: train batches by step (sharded per host) and fixed eval batches.

A batch is a dict of [B, L] arrays: inputs, targets, segment_ids, positions (int32) and weights
(float32, 0 where the target belongs to another document or is padding).
"""

import logging
from collections.abc import Mapping

import numpy as np

from jaxlm.data.packing import PackedRows
from jaxlm.data.sampling import derived_seed, sampling_plan
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")

Batch = dict[str, np.ndarray]


def make_examples(tokens_BC: np.ndarray, segment_ids_BC: np.ndarray,
                  positions_BC: np.ndarray) -> Batch:
  """Rows [B, L + 1] -> model inputs and shifted targets [B, L]."""
  input_segments_BL = segment_ids_BC[:, :-1]
  target_segments_BL = segment_ids_BC[:, 1:]
  # No loss for predicting the next document's bos from this one's eos, nor on padding.
  weights_BL = (target_segments_BL == input_segments_BL) & (input_segments_BL > 0)
  return {
      "inputs": tokens_BC[:, :-1].astype(np.int32),
      "targets": tokens_BC[:, 1:].astype(np.int32),
      "segment_ids": input_segments_BL.astype(np.int32),
      "positions": positions_BC[:, :-1].astype(np.int32),
      "weights": weights_BL.astype(np.float32),
  }


class TrainBatches:
  """Train batches as a pure function of the step, so resuming at step s is exact for free.

  Global row k (k = step * batch_size + j) is `plan.dataset[k]` = (source, row): sources are
  interleaved by weight and each source's rows come in a fresh seeded order every epoch
  (sampling.py). With shard_count hosts, `batch_at(step)` builds only rows
  [shard_index * B / P, (shard_index + 1) * B / P) of the global batch, so the shards'
  batches concatenated in shard order are the unsharded batch. The step is the only iterator
  state: a checkpoint that saves the step saves the data position.
  """

  def __init__(self, rows: Mapping[str, PackedRows], weights: Mapping[str, float],
               batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
               start_rows: Mapping[str, int] | None = None):
    if batch_size < 1:
      raise UserError(f"batch_size must be at least 1, got {batch_size}; fix DataConfig.batch_size")
    if seed < 0:
      raise UserError(f"the data seed must be >= 0, got {seed}; fix DataConfig.seed")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
      raise UserError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size % shard_count:
      raise UserError(f"DataConfig.batch_size={batch_size} is the global batch and must divide "
                      f"by the {shard_count} hosts; use a multiple of {shard_count}")
    self.rows = dict(rows)
    self.names = list(self.rows)
    self.weights = {name: float(weights.get(name, 0.0)) for name in self.names}
    self.active = [name for name in self.names if self.weights[name] > 0]
    if not self.active:
      raise UserError("every source has mixture weight 0; give one a positive weight")
    seq_lens = {r.seq_len for r in self.rows.values()}
    assert len(seq_lens) == 1, seq_lens
    self.seq_len = seq_lens.pop()
    self.batch_size, self.seed = batch_size, seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.local_batch_size = batch_size // shard_count
    self.start_rows = {name: int((start_rows or {}).get(name, 0)) for name in self.names}
    self.plan = sampling_plan(
        [self.rows[n].num_rows for n in self.active], [self.weights[n] for n in self.active],
        [derived_seed(seed, "rows", n) for n in self.active],
        [self.start_rows[n] for n in self.active])

  @property
  def num_rows(self) -> int:
    """Rows in one epoch of every source that is trained on."""
    return sum(self.rows[name].num_rows for name in self.active)

  @property
  def tokens_per_batch(self) -> int:
    """Tokens in the global batch."""
    return self.batch_size * self.seq_len

  def global_rows_at(self, step: int) -> np.ndarray:
    """This host's global row numbers k of batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    first = step * self.batch_size + self.shard_index * self.local_batch_size
    return first + np.arange(self.local_batch_size, dtype=np.int64)

  def row_refs_at(self, step: int) -> list[tuple[str, int]]:
    """(source name, row index) of each row of this host's part of batch `step`."""
    refs = [self.plan.dataset[int(k)] for k in self.global_rows_at(step)]
    return [(self.active[component], int(row)) for component, row in refs]

  def batch_at(self, step: int) -> Batch:
    refs = self.row_refs_at(step)
    shape = (len(refs), self.seq_len + 1)
    tokens, segment_ids, positions = (np.zeros(shape, np.int32) for _ in range(3))
    names = np.array([name for name, _ in refs])
    row_numbers = np.array([row for _, row in refs], np.int64)
    for name in dict.fromkeys(names.tolist()):  # One batched read per source.
      here = names == name
      tokens[here], segment_ids[here], positions[here] = self.rows[name].rows(row_numbers[here])
    return make_examples(tokens, segment_ids, positions)

  def realised_proportions(self, num_steps: int, start_step: int = 0) -> dict[str, float]:
    """Each source's share of the global rows of steps [start_step, start_step + num_steps)."""
    begin, end = start_step * self.batch_size, (start_step + num_steps) * self.batch_size
    counts = self.plan.selection.counts(end) - self.plan.selection.counts(begin)
    total = max(int(counts.sum()), 1)
    shares = dict(zip(self.active, (int(c) / total for c in counts)))
    return {name: shares.get(name, 0.0) for name in self.names}

  def rows_drawn(self, num_steps: int) -> dict[str, int]:
    """Rows of each source consumed by steps [0, num_steps), counting `start_rows`: pass it as
    the next stage's start_rows to continue each source where this stage left off."""
    counts = dict(zip(self.active, self.plan.selection.counts(num_steps * self.batch_size)))
    return {name: self.start_rows[name] + int(counts.get(name, 0)) for name in self.names}

  def log_proportions(self, num_steps: int) -> None:
    realised = self.realised_proportions(num_steps)
    logger.info("train mixture over the first %d steps: %s", num_steps, ", ".join(
        f"{name} {realised[name]:.4f} (target {self.weights[name]:.4f})" for name in self.names))


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int | None = None) -> list[Batch]:
  """Every row once, in order; the last batch is padded with all-zero rows (weight 0) so that
  every batch has the same shape and the eval step compiles once."""
  if batch_size < 1:
    raise UserError(f"eval batch size must be at least 1, got {batch_size}; "
                    "fix DataConfig.eval_batch_size")
  num_rows = rows.num_rows
  if max_batches is not None:
    num_rows = min(num_rows, max_batches * batch_size)
  tokens, segment_ids, positions = rows.rows(np.arange(num_rows))
  batches = []
  for start in range(0, num_rows, batch_size):
    stop = min(start + batch_size, num_rows)
    pad = ((0, batch_size - (stop - start)), (0, 0))
    batches.append(make_examples(*(np.pad(a[start:stop], pad) for a in
                                   (tokens, segment_ids, positions))))
  return batches
