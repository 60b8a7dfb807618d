"""Packing: documents -> fixed-length rows with segment ids and positions, computed on demand.

Documents are taken in a given order (a seeded shuffle for training, stored order for
evaluation), framed as [bos] + tokens + [eos] and concatenated into one stream. Row i is
stream[i * L : i * L + L + 1] for L = seq_len: it holds L inputs and, shifted by one, L targets,
so consecutive rows overlap by one token and every stream token after the first is a target
exactly once. Nothing is dropped or repeated; the tail of the last row is padding.

No row is materialised ahead of time: `rows(indices)` finds each position's document by binary
search over the framed starts and reads only the tokens it needs, so a store far larger than
memory packs the same way as a list of strings.
"""

import numpy as np

from jaxlm.data.documents import TokenizedDocuments
from jaxlm.errors import UserError


class PackedRows:
  """Rows of seq_len + 1 tokens over `documents` taken in `order` (default: as stored)."""

  def __init__(self, documents: TokenizedDocuments, seq_len: int, bos_id: int, eos_id: int,
               pad_id: int = 0, order: np.ndarray | None = None, name: str = "the corpus"):
    if seq_len < 1:
      raise UserError(f"seq_len must be at least 1, got {seq_len}; fix DataConfig.seq_len")
    self.documents = documents
    self.seq_len = seq_len
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    order = np.arange(documents.num_documents) if order is None else np.asarray(order)
    self.order = order.astype(np.int64)
    framed_lengths = documents.lengths[self.order] + 2
    self.framed_starts = np.cumsum(framed_lengths) - framed_lengths  # [D], in stream order.
    self.stream_length = int(framed_lengths.sum())
    # ceil((S - 1) / L): the rows needed for every token after the first to be a target.
    self.num_rows = max(-(-(self.stream_length - 1) // seq_len), 0)
    if self.num_rows == 0:
      raise UserError(f"{name} has no text; check the data source (paths, field, separator, "
                      "domains)")

  def rows(self, row_indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions), each int32 [N, seq_len + 1], for rows `row_indices`.

    segment_ids are 1, 2, 3, ... per document in order of appearance in the row (0 = padding);
    positions count from 0 at each segment's first token in the row (0 on padding).
    """
    rows_N = np.asarray(row_indices, dtype=np.int64).reshape(-1)
    if rows_N.size and (rows_N.min() < 0 or rows_N.max() >= self.num_rows):
      raise IndexError(f"row index out of range [0, {self.num_rows})")
    row_start_N1 = rows_N[:, None] * self.seq_len
    position_NC = row_start_N1 + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
    in_stream_NC = position_NC < self.stream_length
    position_NC = np.minimum(position_NC, self.stream_length - 1)

    slot_NC = np.searchsorted(self.framed_starts, position_NC, side="right") - 1
    offset_NC = position_NC - self.framed_starts[slot_NC]  # 0 = bos, length + 1 = eos.
    document_NC = self.order[slot_NC]
    is_eos_NC = offset_NC == self.documents.lengths[document_NC] + 1
    is_body_NC = (offset_NC > 0) & ~is_eos_NC & in_stream_NC

    tokens_NC = np.full(position_NC.shape, self.bos_id, dtype=np.int32)
    tokens_NC[is_eos_NC] = self.eos_id
    body_positions = self.documents.starts[document_NC[is_body_NC]] + offset_NC[is_body_NC] - 1
    tokens_NC[is_body_NC] = self.documents.tokens.gather(body_positions)
    tokens_NC[~in_stream_NC] = self.pad_id

    # Consecutive stream slots are consecutive documents, so a row's k-th segment is slot k - 1
    # after the row's first: no scan needed.
    segment_ids_NC = (slot_NC - slot_NC[:, :1] + 1).astype(np.int32)
    segment_ids_NC[~in_stream_NC] = 0
    segment_start_NC = np.maximum(self.framed_starts[slot_NC], row_start_N1)
    positions_NC = (position_NC - segment_start_NC).astype(np.int32)
    positions_NC[~in_stream_NC] = 0
    return tokens_NC, segment_ids_NC, positions_NC

  def all_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row; for tests and small corpora."""
    return self.rows(np.arange(self.num_rows))
