"""Packing: documents -> fixed-length rows with segment ids and positions.

Documents are framed as [bos] + tokens + [eos] and concatenated into one token stream. Row i is
stream[i * L : i * L + L + 1] for L = seq_len: a row holds L inputs and, shifted by one, L targets,
so consecutive rows overlap by one token and every stream token after the first is a target
exactly once. Nothing is dropped or repeated; the tail of the last row is padding.
"""

import dataclasses

import numpy as np

from jaxlm.errors import UserError

PAD_ID = 0  # Padding token and its segment id; the loss weights of padding are zero anyway.


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Packed rows; every array is int32 [num_rows, seq_len + 1]."""
  tokens: np.ndarray
  segment_ids: np.ndarray  # 1, 2, 3, ... per document in order of appearance in the row; 0 = pad.
  positions: np.ndarray  # From 0 at each segment's first token in the row; 0 on padding.

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1


def _framed_stream(documents_tokens, bos_id: int, eos_id: int):
  """Returns (tokens, document index from 1, document start offset), each a [S] stream.

  Empty documents are skipped, so consecutive documents have consecutive indices.
  """
  documents_tokens = [np.asarray(t, dtype=np.int32) for t in documents_tokens]
  documents_tokens = [t for t in documents_tokens if t.size]
  if not documents_tokens:
    return (np.zeros((0,), np.int32),) * 3
  bos, eos = np.array([bos_id], np.int32), np.array([eos_id], np.int32)
  pieces = []
  for tokens in documents_tokens:
    pieces += [bos, tokens, eos]
  stream_S = np.concatenate(pieces)
  lengths_D = np.array([t.size + 2 for t in documents_tokens], dtype=np.int64)
  starts_D = np.cumsum(lengths_D) - lengths_D
  document_S = np.repeat(np.arange(1, lengths_D.size + 1, dtype=np.int32), lengths_D)
  document_start_S = np.repeat(starts_D, lengths_D)
  return stream_S, document_S, document_start_S


def _rows_of(stream_S: np.ndarray, num_rows: int, seq_len: int) -> np.ndarray:
  """[num_rows, seq_len + 1] copy of the overlapping windows starting every seq_len tokens."""
  windows = np.lib.stride_tricks.sliding_window_view(stream_S, seq_len + 1)
  return np.ascontiguousarray(windows[::seq_len][:num_rows])


def pack_stream(documents_tokens: list[np.ndarray], seq_len: int, bos_id: int, eos_id: int,
                name: str = 'the corpus') -> PackedRows:
  """Packs tokenized documents into overlapping rows of seq_len + 1 tokens (see module doc)."""
  if seq_len < 1:
    raise UserError(f'seq_len must be at least 1, got {seq_len}; fix DataConfig.seq_len')
  stream_S, document_S, document_start_S = _framed_stream(documents_tokens, bos_id, eos_id)
  num_rows = -(-(stream_S.size - 1) // seq_len)  # ceil((S - 1) / L): rows needed to target all.
  if num_rows <= 0:
    raise UserError(f'{name} has no text; check the data source (paths, separator, domains)')

  pad = num_rows * seq_len + 1 - stream_S.size
  tokens_RC = _rows_of(np.pad(stream_S, (0, pad), constant_values=PAD_ID), num_rows, seq_len)
  document_RC = _rows_of(np.pad(document_S, (0, pad)), num_rows, seq_len)
  document_start_RC = _rows_of(np.pad(document_start_S, (0, pad)), num_rows, seq_len)
  is_pad_RC = document_RC == 0

  # Documents are numbered consecutively along the stream, so a row's k-th segment is the
  # document k - 1 after the row's first one: no scan needed.
  segment_ids_RC = document_RC - document_RC[:, :1] + 1
  segment_ids_RC[is_pad_RC] = 0

  # A segment starts at its document's start, or at the row start if the document began earlier.
  row_start_R1 = np.arange(num_rows, dtype=np.int64)[:, None] * seq_len
  column_1C = np.arange(seq_len + 1, dtype=np.int64)[None, :]
  segment_start_RC = np.maximum(document_start_RC, row_start_R1)
  positions_RC = (row_start_R1 + column_1C - segment_start_RC).astype(np.int32)
  positions_RC[is_pad_RC] = 0
  return PackedRows(tokens=tokens_RC, segment_ids=segment_ids_RC.astype(np.int32),
                    positions=positions_RC)
