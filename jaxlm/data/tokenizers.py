"""Tokenizers: text <-> int32 ids behind one small interface.

Every tokenizer has `encode(text) -> int32 [T]` (no special ids added), `encode_batch(texts)`,
`decode(ids) -> str` (special and out-of-range ids skipped), `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, `byte_lengths()` (UTF-8 bytes each id stands for, 0 for specials: summed over targets it
turns nats/token into bits per byte) and `fingerprint` (names the exact vocabulary, so a tokenized
store can refuse a different tokenizer).

  byte_tokenizer()                       UTF-8 bytes, no files (the default)
  sentencepiece_tokenizer(model_path)    a SentencePiece .model (tools/train_tokenizer.py makes one)
  huggingface_tokenizer(path)            a Hugging Face tokenizer.json (or a model directory holding
                                         one), via the `tokenizers` library

Choose one in gin: `DataConfig.tokenizer = @sentencepiece_tokenizer()` and
`sentencepiece_tokenizer.model_path = "/data/sp.model"`.
"""

import hashlib
import json
import os
import pathlib

import gin
import numpy as np

from jaxlm.errors import UserError


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: byte b is id b + 3."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  num_special = 3
  vocab_size = 256 + num_special
  fingerprint = "byte-v1"

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text`'s UTF-8 bytes; adds no special ids."""
    bytes_T = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return bytes_T.astype(np.int32) + self.num_special

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    """Inverse of `encode`; skips special and out-of-vocabulary ids."""
    ids_T = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep_T = (ids_T >= self.num_special) & (ids_T < self.vocab_size)
    bytes_T = (ids_T[keep_T] - self.num_special).astype(np.uint8)
    # 'replace' because a model can emit a byte sequence that is not valid UTF-8.
    return bytes_T.tobytes().decode("utf-8", errors="replace")

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for, int32 [vocab_size]: 0 for specials, else 1."""
    lengths_V = np.ones((self.vocab_size,), np.int32)
    lengths_V[:self.num_special] = 0
    return lengths_V


def _file_fingerprint(kind: str, data: bytes) -> str:
  return f"{kind}:{hashlib.sha256(data).hexdigest()[:16]}"


def _read_tokenizer_file(path: str | os.PathLike, what: str, binding: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise UserError(f"cannot read the {what} {str(path)!r} ({e.strerror}); fix {binding}") from None


class SentencePieceTokenizer:
  """A SentencePiece model file. Needs bos and eos pieces (tools/train_tokenizer.py makes them)."""

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = str(model_path)
    self._load(_read_tokenizer_file(model_path, "SentencePiece model",
                                    "sentencepiece_tokenizer.model_path"))

  def _load(self, proto: bytes) -> None:
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self._proto = proto
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise UserError(f"{self.model_path!r} is not a SentencePiece model that loads ({e}); "
                      "fix sentencepiece_tokenizer.model_path or retrain it with "
                      "tools/train_tokenizer.py") from None
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise UserError(f"the SentencePiece model {self.model_path!r} has no bos or eos piece; "
                      "retrain it with tools/train_tokenizer.py (which adds both)")
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    # Padding needs some valid id; its loss weight is zero, so which one does not matter.
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
    self.fingerprint = _file_fingerprint("sentencepiece", proto)

  def __getstate__(self):  # Picklable, so parallel tokenization workers can receive it.
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load(state["proto"])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids) -> str:
    ids_T = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids_T = ids_T[(ids_T >= 0) & (ids_T < self.vocab_size)]
    return self._sp.decode([int(i) for i in ids_T])

  def byte_lengths(self) -> np.ndarray:
    """Bytes per piece ("▁" is a space); byte pieces are 1, control and unknown pieces 0.

    A model trained with add_dummy_prefix (SentencePiece's default, not tools/train_tokenizer's)
    counts one extra space per document.
    """
    lengths_V = np.zeros((self.vocab_size,), np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
        continue
      if self._sp.is_byte(i):
        lengths_V[i] = 1
      else:
        lengths_V[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths_V


def _gpt2_unicode_to_byte() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as one printable char."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[chr(b)] = b
    else:
      mapping[chr(256 + extra)] = b
      extra += 1
  return mapping


def _decoder_types(decoder: dict | None) -> set[str]:
  if not decoder:
    return set()
  if decoder.get("type") == "Sequence":
    return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
  return {decoder.get("type")}


_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`. bos/eos/pad are found among the usual special-token names
  unless given (GPT-2 style files have only `<|endoftext|>`, which then serves as both)."""

  def __init__(self, path: str | os.PathLike, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None):
    if os.path.isdir(path):  # A Hugging Face model directory: its own tokenizer.
      path = os.path.join(path, "tokenizer.json")
    self.path = str(path)
    self._names = (bos_token, eos_token, pad_token)
    self._load(_read_tokenizer_file(path, "tokenizer.json", "huggingface_tokenizer.path"))

  def _load(self, data: bytes) -> None:
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError("Hugging Face tokenizer files need the `tokenizers` library: "
                      "pip install 'jaxlm[hf]'") from None
    self._json = data
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  # The library raises bare Exceptions.
      raise UserError(f"{self.path!r} is not a Hugging Face tokenizer.json that loads ({e}); "
                      "fix huggingface_tokenizer.path") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    bos, eos, pad = self._names
    self.bos_id = self._special_id(bos, _BOS_CANDIDATES, "bos_token")
    self.eos_id = self._special_id(eos, _EOS_CANDIDATES, "eos_token")
    has_pad = pad or any(self._tok.token_to_id(c) is not None for c in _PAD_CANDIDATES)
    self.pad_id = self._special_id(pad, _PAD_CANDIDATES, "pad_token") if has_pad else self.eos_id
    self.fingerprint = _file_fingerprint("huggingface", data)

  def _special_id(self, name, candidates, binding):
    for candidate in ([name] if name else candidates):
      token_id = self._tok.token_to_id(candidate)
      if token_id is not None:
        return token_id
    specials = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
    raise UserError(f"the tokenizer {self.path!r} has no {binding.split('_')[0]} token among "
                    f"{[name] if name else list(candidates)}; its special tokens are {specials}; "
                    f"set huggingface_tokenizer.{binding}")

  def __getstate__(self):
    return {"path": self.path, "names": self._names, "json": self._json}

  def __setstate__(self, state):
    self.path, self._names = state["path"], state["names"]
    self._load(state["json"])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids) -> str:
    ids_T = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids_T = ids_T[(ids_T >= 0) & (ids_T < self.vocab_size)]
    return self._tok.decode([int(i) for i in ids_T], skip_special_tokens=True)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(token_id)

  def byte_lengths(self) -> np.ndarray:
    """Bytes per token for byte-level BPE (GPT-2 alphabet), Metaspace ("▁" = space) and byte
    fallback (`<0x41>`) vocabularies; special tokens are 0. Other decoders (WordPiece's "##")
    are approximated by the token's own UTF-8 length."""
    decoders = _decoder_types(json.loads(self._json).get("decoder"))
    specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    unicode_to_byte = _gpt2_unicode_to_byte() if "ByteLevel" in decoders else None
    lengths_V = np.zeros((self.vocab_size,), np.int32)
    for i in range(self.vocab_size):
      token = self._tok.id_to_token(i)
      if token is None or i in specials:
        continue
      if "ByteFallback" in decoders and len(token) == 6 and token.startswith("<0x"):
        lengths_V[i] = 1
      elif unicode_to_byte is not None and all(c in unicode_to_byte for c in token):
        lengths_V[i] = len(token)
      elif "WordPiece" in decoders and token.startswith("##"):
        lengths_V[i] = len(token[2:].encode("utf-8"))
      else:
        lengths_V[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths_V


@gin.configurable
def byte_tokenizer() -> ByteTokenizer:
  return ByteTokenizer()


@gin.configurable
def sentencepiece_tokenizer(model_path: str = gin.REQUIRED) -> SentencePieceTokenizer:
  return SentencePieceTokenizer(model_path)


@gin.configurable
def huggingface_tokenizer(path: str = gin.REQUIRED, bos_token: str | None = None,
                          eos_token: str | None = None,
                          pad_token: str | None = None) -> HuggingFaceTokenizer:
  return HuggingFaceTokenizer(path, bos_token, eos_token, pad_token)


def resolve_tokenizer(tokenizer):
  """A tokenizer, a factory of one (`@sentencepiece_tokenizer` unevaluated), or None (bytes)."""
  if tokenizer is None:
    return ByteTokenizer()
  if callable(tokenizer) and not hasattr(tokenizer, "encode"):
    tokenizer = tokenizer()
  for attribute in ("encode", "decode", "vocab_size", "bos_id", "eos_id", "byte_lengths"):
    if not hasattr(tokenizer, attribute):
      raise UserError(f"DataConfig.tokenizer {tokenizer!r} has no {attribute!r}; use "
                      "@byte_tokenizer(), @sentencepiece_tokenizer() or @huggingface_tokenizer()")
  return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer type that holds every id (halves storage for <= 65536 ids)."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_batch(tokenizer, texts: list[str]) -> list[np.ndarray]:
  """`tokenizer.encode_batch` when it has one (SentencePiece and HF batch in C++/Rust)."""
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(texts)
  return [np.asarray(tokenizer.encode(t), dtype=np.int32) for t in texts]
