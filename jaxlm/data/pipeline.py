"""Batches for the trainer: shuffled train batches by step, and fixed eval batches.

Numpy only (no jax, no grain: `import grain` pulls in jax), so the data path stays light.
A batch is a dict of [B, L] arrays: inputs, targets, segment_ids, positions (int32) and weights
(float32, 0 where the target belongs to another document or is padding).
"""

import dataclasses
import logging
from collections.abc import Callable

import gin
import numpy as np

from jaxlm.data import sources
from jaxlm.data.packing import PackedRows, pack_stream
from jaxlm.errors import UserError

logger = logging.getLogger('jaxlm')

Batch = dict[str, np.ndarray]


def make_examples(tokens_BC: np.ndarray, segment_ids_BC: np.ndarray,
                  positions_BC: np.ndarray) -> Batch:
  """Rows [B, L + 1] -> model inputs and shifted targets [B, L]."""
  input_segments_BL = segment_ids_BC[:, :-1]
  target_segments_BL = segment_ids_BC[:, 1:]
  # No loss for predicting the next document's bos from this one's eos, nor on padding.
  weights_BL = (target_segments_BL == input_segments_BL) & (input_segments_BL > 0)
  return {
      'inputs': tokens_BC[:, :-1].astype(np.int32),
      'targets': tokens_BC[:, 1:].astype(np.int32),
      'segment_ids': input_segments_BL.astype(np.int32),
      'positions': positions_BC[:, :-1].astype(np.int32),
      'weights': weights_BL.astype(np.float32),
  }


class TrainBatches:
  """Train batches as a pure function of the step, so resuming at step s is exact for free.

  The k-th row drawn (k = step * batch_size + j) is permutation(seed, epoch)[k % num_rows] with
  epoch = k // num_rows: every row once per epoch, a fresh order each epoch, and batches may
  straddle epochs (or span several when num_rows < batch_size).
  """

  def __init__(self, rows: PackedRows, batch_size: int, seed: int):
    if batch_size < 1:
      raise UserError(f'batch_size must be at least 1, got {batch_size}; fix DataConfig.batch_size')
    if seed < 0:
      raise UserError(f'the data seed must be >= 0, got {seed}; fix DataConfig.seed')
    self.rows = rows
    self.batch_size = batch_size
    self.seed = seed
    self._permutations = {}  # epoch -> row order; a few recent epochs only.

  @property
  def num_rows(self) -> int:
    return self.rows.num_rows

  @property
  def seq_len(self) -> int:
    return self.rows.seq_len

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size * self.seq_len

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 4:
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng((self.seed, epoch))
      self._permutations[epoch] = rng.permutation(self.num_rows)
    return self._permutations[epoch]

  def row_indices_at(self, step: int) -> np.ndarray:
    """The rows of batch `step`, in batch order."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    drawn_B = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epoch_B, offset_B = np.divmod(drawn_B, self.num_rows)
    rows_B = np.empty_like(drawn_B)
    for epoch in np.unique(epoch_B):
      in_epoch = epoch_B == epoch
      rows_B[in_epoch] = self._permutation(int(epoch))[offset_B[in_epoch]]
    return rows_B

  def batch_at(self, step: int) -> Batch:
    rows_B = self.row_indices_at(step)
    return make_examples(self.rows.tokens[rows_B], self.rows.segment_ids[rows_B],
                         self.rows.positions[rows_B])


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int | None = None) -> list[Batch]:
  """Every row once, in order; the last batch is padded with all-zero rows (weight 0) so that
  every batch has the same shape and the eval step compiles once."""
  if batch_size < 1:
    raise UserError(f'eval batch size must be at least 1, got {batch_size}; '
                    'fix DataConfig.eval_batch_size')
  num_rows = rows.num_rows
  if max_batches is not None:
    num_rows = min(num_rows, max_batches * batch_size)
  batches = []
  for start in range(0, num_rows, batch_size):
    stop = min(start + batch_size, num_rows)
    pad = ((0, batch_size - (stop - start)), (0, 0))
    batches.append(make_examples(*(np.pad(a[start:stop], pad) for a in
                                   (rows.tokens, rows.segment_ids, rows.positions))))
  return batches


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train and evaluate on, and how to cut it into batches."""
  source: Callable[[], list[str]] = sources.builtin_corpus
  valid_source: Callable[[], list[str]] | None = None  # If set, used instead of a split.
  valid_fraction: float = 0.02
  seq_len: int = 256
  batch_size: int = 16
  eval_batch_size: int | None = None  # None: batch_size.
  max_eval_batches: int | None = 16  # None: the whole validation split.
  seed: int = 0


def _documents_from(source) -> list[str]:
  # A gin binding may pass the source (`@text_files`) or its result (`@text_files()`).
  return list(source()) if callable(source) else list(source)


def _pack_split(documents: list[str], tokenizer, seq_len: int, split: str) -> PackedRows:
  if not documents:
    raise UserError(f'the {split} split has no documents; check DataConfig.source/valid_source '
                    'and valid_fraction')
  documents_tokens = [tokenizer.encode(d) for d in documents]
  rows = pack_stream(documents_tokens, seq_len, tokenizer.bos_id, tokenizer.eos_id,
                     name=f'the {split} split')
  num_tokens = sum(t.size for t in documents_tokens)
  logger.info('%s split: %d documents, %d tokens, %d rows of %d', split, len(documents),
              num_tokens, rows.num_rows, seq_len)
  return rows


def build_datasets(config: DataConfig, tokenizer) -> tuple[TrainBatches, list[Batch]]:
  """Reads, splits, tokenizes and packs the data; returns (train batches, eval batches)."""
  if config.seq_len < 1:
    raise UserError(f'seq_len must be at least 1, got {config.seq_len}; fix DataConfig.seq_len')
  if config.batch_size < 1:
    raise UserError(f'batch_size must be at least 1, got {config.batch_size}; '
                    'fix DataConfig.batch_size')
  documents = _documents_from(config.source)
  if config.valid_source is not None:
    train_documents, valid_documents = documents, _documents_from(config.valid_source)
  else:
    train_documents, valid_documents = sources.split_train_valid(
        documents, config.valid_fraction, config.seed)
  train_rows = _pack_split(train_documents, tokenizer, config.seq_len, 'train')
  valid_rows = _pack_split(valid_documents, tokenizer, config.seq_len, 'valid')
  eval_batch_size = config.eval_batch_size or config.batch_size
  return (TrainBatches(train_rows, config.batch_size, config.seed),
          eval_batches(valid_rows, eval_batch_size, config.max_eval_batches))
