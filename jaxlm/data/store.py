"""A tokenized store: documents' tokens in tensorstore zarr3 arrays, plus a manifest.

    <store>/tokens/            uint16 (or uint32) [T]: every document's tokens, back to back
    <store>/document_ends/     int64 [D]: exclusive end offset of each document in tokens
    <store>/document_hashes/   uint64 [D]: 64-bit BLAKE2b of each document's UTF-8 text
    <store>/manifest.json      tokenizer, counts, source checksums; written last

A store lives at a local path or any tensorstore kvstore URL (`gs://bucket/path`, `s3://...`,
`file:///...`, `memory://...` in tests); the code is the same for all of them. The manifest is
written only after every array write has completed, and removed before a store is rewritten, so
a store without one is incomplete: `open_store` refuses it instead of training on half a corpus.
"""

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import numpy as np
import tensorstore as ts

from jaxlm.data.documents import TokenizedDocuments
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")

FORMAT = "jaxlm.tokenized_store"
VERSION = 1
MANIFEST = "manifest.json"
_UNBOUNDED = 1 << 40  # Arrays are created this long and cut to size when the writer closes.
_CHUNK = {"tokens": 1 << 17, "document_ends": 1 << 16, "document_hashes": 1 << 16}

_context = None


def context() -> ts.Context:
  """One shared context: its chunk cache keeps a training run's reads off the disk or network,
  and `memory://` stores stay visible across opens within a process."""
  global _context
  if _context is None:
    cache_bytes = int(os.environ.get("JAXLM_STORE_CACHE_BYTES", 256 << 20))
    _context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
  return _context


def store_url(path: str | os.PathLike) -> str:
  """A local path or a kvstore URL -> a URL ending in "/"."""
  path = os.fspath(path)
  if "://" not in path:
    path = pathlib.Path(path).expanduser().absolute().as_uri()
  return path if path.endswith("/") else path + "/"


def _kvstore(url: str) -> ts.KvStore:
  try:
    return ts.KvStore.open(url, context=context()).result()
  except ValueError as e:
    raise UserError(f"cannot open the store location {url!r} ({e}); give a local path or a "
                    "tensorstore URL such as gs://bucket/path") from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
  """The manifest of a complete store, or None when there is none (never prepared, or
  interrupted)."""
  result = _kvstore(store_url(path)).read(MANIFEST).result()
  if result.state != "value":
    return None
  return json.loads(result.value)


def delete_manifest(path: str | os.PathLike) -> None:
  """Marks a store incomplete before it is rewritten."""
  kv = _kvstore(store_url(path))
  if kv.read(MANIFEST).result().state == "value":
    del kv[MANIFEST]


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
  _kvstore(store_url(path)).write(MANIFEST, json.dumps(manifest, indent=2).encode()).result()


def _array_spec(url: str, name: str, dtype: np.dtype | None = None) -> dict[str, Any]:
  spec = {"driver": "zarr3", "kvstore": url + name + "/"}
  if dtype is not None:
    spec["metadata"] = {
        "shape": [_UNBOUNDED],
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [_CHUNK[name]]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": 3}}],
    }
  return spec


class _Appender:
  """Appends to a 1-D array in whole chunks; up to a few writes run concurrently."""

  def __init__(self, array: ts.TensorStore, chunk: int, max_in_flight: int = 8):
    self.array, self.chunk, self.max_in_flight = array, chunk, max_in_flight
    self.length = 0
    self._pending: list[np.ndarray] = []
    self._pending_size = 0
    self._writes = []

  def append(self, values: np.ndarray) -> None:
    self._pending.append(values)
    self._pending_size += values.size
    if self._pending_size >= self.chunk:
      self._flush(final=False)

  def _flush(self, final: bool) -> None:
    if not self._pending:
      return
    data = np.concatenate(self._pending)
    size = data.size if final else data.size // self.chunk * self.chunk
    if size:
      self._writes.append(self.array[self.length:self.length + size].write(data[:size]))
      self.length += size
    rest = data[size:]
    self._pending, self._pending_size = ([rest] if rest.size else []), rest.size
    while len(self._writes) > self.max_in_flight:
      self._writes.pop(0).result()

  def close(self) -> int:
    self._flush(final=True)
    for write in self._writes:
      write.result()
    self.array.resize(exclusive_max=[self.length], resize_metadata_only=True).result()
    return self.length


class StoreWriter:
  """Writes documents to a new store; `finish(manifest)` completes it."""

  def __init__(self, path: str | os.PathLike, token_dtype: np.dtype):
    self.url = store_url(path)
    delete_manifest(self.url)
    arrays = {}
    for name, dtype in (("tokens", token_dtype), ("document_ends", np.int64),
                        ("document_hashes", np.uint64)):
      try:
        arrays[name] = ts.open(_array_spec(self.url, name, dtype), create=True,
                               delete_existing=True, context=context()).result()
      except ValueError as e:
        raise UserError(f"cannot create the store at {self.url} ({e}); check the path and that "
                        "it is writable") from None
    self._tokens = _Appender(arrays["tokens"], _CHUNK["tokens"])
    self._ends = _Appender(arrays["document_ends"], _CHUNK["document_ends"])
    self._hashes = _Appender(arrays["document_hashes"], _CHUNK["document_hashes"])
    self.token_dtype = np.dtype(token_dtype)
    self.num_tokens = 0
    self.num_documents = 0

  def append(self, tokens_list: list[np.ndarray], hashes: np.ndarray) -> None:
    """Appends documents (non-empty token arrays) and their text hashes."""
    if not tokens_list:
      return
    lengths = np.array([t.size for t in tokens_list], dtype=np.int64)
    self._tokens.append(np.concatenate(tokens_list).astype(self.token_dtype))
    self._ends.append(self.num_tokens + np.cumsum(lengths))
    self._hashes.append(np.asarray(hashes, dtype=np.uint64))
    self.num_tokens += int(lengths.sum())
    self.num_documents += lengths.size

  def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
    """Waits for every write, then writes the manifest: only now does the store exist."""
    lengths = (self._tokens.close(), self._ends.close(), self._hashes.close())
    assert lengths == (self.num_tokens, self.num_documents, self.num_documents), lengths
    manifest = {"format": FORMAT, "version": VERSION, "num_documents": self.num_documents,
                "num_tokens": self.num_tokens, "token_dtype": self.token_dtype.name, **manifest}
    write_manifest(self.url, manifest)
    return manifest


@dataclasses.dataclass(frozen=True)
class TensorStoreTokens:
  """Tokens read from a tensorstore array at arbitrary positions, in one batched read."""
  array: ts.TensorStore

  def gather(self, positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
      return np.zeros(positions.shape, np.int32)
    return self.array[positions.reshape(-1)].read().result().reshape(positions.shape).astype(
        np.int32)


@dataclasses.dataclass(frozen=True)
class Store:
  url: str
  manifest: dict[str, Any]
  documents: TokenizedDocuments


def open_store(path: str | os.PathLike, binding: str = "tokenized_store.path") -> Store:
  """Opens a complete store for reading; its document index is loaded, its tokens stay put."""
  url = store_url(path)
  manifest = read_manifest(url)
  if manifest is None:
    raise UserError(f"{url} is not a complete tokenized store (no {MANIFEST}: never prepared, "
                    "or prepare_data was interrupted); run tools/prepare_data.py, or fix "
                    f"{binding}")
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise UserError(f"{url} holds a {manifest.get('format')} v{manifest.get('version')} store; "
                    f"this jaxlm reads {FORMAT} v{VERSION}: prepare it again")
  arrays = {}
  for name in ("tokens", "document_ends", "document_hashes"):
    arrays[name] = ts.open(_array_spec(url, name), read=True, context=context(),
                           recheck_cached_data="open").result()
  num_documents, num_tokens = manifest["num_documents"], manifest["num_tokens"]
  ends = arrays["document_ends"][:num_documents].read().result().astype(np.int64)
  hashes = arrays["document_hashes"][:num_documents].read().result().astype(np.uint64)
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  if num_documents and int(ends[-1]) != num_tokens:
    raise UserError(f"{url} is inconsistent (documents end at {int(ends[-1])}, manifest says "
                    f"{num_tokens} tokens); prepare it again with --overwrite")
  documents = TokenizedDocuments(TensorStoreTokens(arrays["tokens"][:num_tokens]), starts,
                                 ends - starts, hashes)
  return Store(url, manifest, documents)
