"""Tokenized documents: spans of one token array, in memory or in a tensorstore store.

Document d is tokens[starts[d] : starts[d] + lengths[d]]. Packing (packing.py) only ever asks for
tokens at given positions (`gather`), so an in-memory array and a store on disk or in a bucket
serve the same code. Each document also carries a 64-bit hash of its text, which decides the
train/valid split without reading any tokens.
"""

import dataclasses
import hashlib
from typing import Protocol

import numpy as np

from jaxlm.data.tokenizers import encode_batch, token_dtype
from jaxlm.errors import UserError


class TokenArray(Protocol):
  """A 1-D token array that can be read at arbitrary positions."""

  def gather(self, positions: np.ndarray) -> np.ndarray:
    """int32 tokens at int64 `positions` (any shape, any order)."""


@dataclasses.dataclass(frozen=True)
class InMemoryTokens:
  tokens: np.ndarray

  def gather(self, positions: np.ndarray) -> np.ndarray:
    return self.tokens[positions].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
  """Document d = tokens[starts[d] : starts[d] + lengths[d]]; every length is > 0."""
  tokens: TokenArray
  starts: np.ndarray  # int64 [D]
  lengths: np.ndarray  # int64 [D]
  hashes: np.ndarray  # uint64 [D], of the document's UTF-8 text

  @property
  def num_documents(self) -> int:
    return int(self.lengths.size)

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())

  def select(self, keep) -> "TokenizedDocuments":
    """The documents at a boolean mask or index array, sharing the same tokens."""
    return TokenizedDocuments(self.tokens, self.starts[keep], self.lengths[keep], self.hashes[keep])

  def document(self, d: int) -> np.ndarray:
    start = int(self.starts[d])
    return self.tokens.gather(np.arange(start, start + int(self.lengths[d]), dtype=np.int64))


def bytes_hashes(items: list[bytes]) -> np.ndarray:
  """Unsalted 64-bit BLAKE2b of each item, uint64 [N]."""
  return np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
                   for b in items], dtype=np.uint64).reshape(-1)


def text_hashes(texts: list[str]) -> np.ndarray:
  """Hashes of each text's UTF-8 bytes; a prepared store keeps the same ones."""
  return bytes_hashes([t.encode("utf-8") for t in texts])


def tokenize_texts(texts: list[str], tokenizer) -> tuple[list[np.ndarray], np.ndarray]:
  """(token arrays, hashes) of the texts that tokenize to at least one token."""
  tokens = encode_batch(tokenizer, texts)
  keep = [i for i, t in enumerate(tokens) if t.size]
  return [tokens[i] for i in keep], text_hashes([texts[i] for i in keep])


def from_token_lists(tokens_list: list[np.ndarray], hashes: np.ndarray | None = None,
                     vocab_size: int = 1 << 31) -> TokenizedDocuments:
  """In-memory documents from token arrays; empty ones are dropped."""
  keep = [i for i, t in enumerate(tokens_list) if len(t)]
  lengths = np.array([len(tokens_list[i]) for i in keep], dtype=np.int64)
  dtype = token_dtype(vocab_size) if vocab_size <= 1 << 32 else np.int64
  tokens = (np.concatenate([np.asarray(tokens_list[i]) for i in keep]).astype(dtype) if keep
            else np.zeros((0,), dtype))
  if hashes is None:  # Hash the tokens instead of the text: tests and token-level callers.
    hashes = bytes_hashes([np.asarray(tokens_list[i], np.int64).tobytes() for i in keep])
  else:
    hashes = np.asarray(hashes, dtype=np.uint64)[keep]
  starts = np.cumsum(lengths) - lengths
  return TokenizedDocuments(InMemoryTokens(tokens), starts, lengths, hashes)


def tokenize_documents(texts: list[str], tokenizer) -> TokenizedDocuments:
  tokens_list, hashes = tokenize_texts(texts, tokenizer)
  return from_token_lists(tokens_list, hashes, tokenizer.vocab_size)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A bijective 64-bit mixer (Steele et al. 2014), so a seed reshuffles the split cheaply."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_train_valid(documents: TokenizedDocuments, valid_fraction: float, seed: int,
                      name: str = "the data") -> tuple[TokenizedDocuments, TokenizedDocuments]:
  """Disjoint (train, valid) documents, decided by a seeded mix of each document's text hash.

  The round(valid_fraction * D) lowest keys (at least 1, at most D - 1) go to valid, so the split
  does not depend on document order, identical documents land on the same side, and the same
  text split the same way whether it was read from files or from a prepared store. A single
  document is cut at token (1 - valid_fraction) * length instead, so a one-file corpus still gets
  a held-out tail.
  """
  if not 0.0 < valid_fraction < 1.0:
    raise UserError(f"valid_fraction must be in (0, 1), got {valid_fraction}; "
                    "e.g. set DataConfig.valid_fraction = 0.02")
  num_documents = documents.num_documents
  if num_documents == 0:
    raise UserError(f"{name} has no text; check the data source (paths, field, separator, "
                    "domains)")
  if num_documents == 1:
    length = int(documents.lengths[0])
    if length < 2:
      raise UserError(f"{name} is a single one-token document: too little text to hold out a "
                      "validation split; give it a valid_source or more text")
    cut = min(max(round(length * (1.0 - valid_fraction)), 1), length - 1)
    train = dataclasses.replace(documents, lengths=np.array([cut], np.int64))
    valid = dataclasses.replace(documents, starts=documents.starts + cut,
                                lengths=np.array([length - cut], np.int64))
    return train, valid
  seed_key = _splitmix64(np.array([seed], dtype=np.uint64))
  keys = _splitmix64(documents.hashes ^ seed_key)
  num_valid = min(max(round(valid_fraction * num_documents), 1), num_documents - 1)
  threshold = np.partition(keys, num_valid - 1)[num_valid - 1]
  is_valid = keys <= threshold
  if is_valid.all():
    raise UserError(f"every document of {name} went to the validation split (they are all the "
                    "same text); give it more distinct documents or its own validation set")
  return documents.select(~is_valid), documents.select(is_valid)
