"""Tokenizers: text <-> int32 ids, behind two methods (`encode`, `decode`).

The byte tokenizer needs no files, so a fresh checkout can train at once. Richer tokenizers
(SentencePiece, Hugging Face) will sit behind the same interface and the same special-id fields.
"""

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: byte b is id b + 3."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  num_special = 3
  vocab_size = 256 + num_special

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text`'s UTF-8 bytes; adds no special ids."""
    bytes_T = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
    return bytes_T.astype(np.int32) + self.num_special

  def decode(self, ids) -> str:
    """Inverse of `encode`; skips special and out-of-vocabulary ids."""
    ids_T = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep_T = (ids_T >= self.num_special) & (ids_T < self.vocab_size)
    bytes_T = (ids_T[keep_T] - self.num_special).astype(np.uint8)
    # 'replace' because a model can emit a byte sequence that is not valid UTF-8.
    return bytes_T.tobytes().decode('utf-8', errors='replace')

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for, int32 [vocab_size]: 0 for specials, else 1.

    Summed over weighted targets it turns a loss in nats/token into bits per byte.
    """
    lengths_V = np.ones((self.vocab_size,), np.int32)
    lengths_V[:self.num_special] = 0
    return lengths_V
