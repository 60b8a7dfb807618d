"""prepare_data: text, JSON-lines and Parquet files -> a tokenized store (store.py).

    python tools/prepare_data.py --input='/data/web/*.jsonl' --output=/data/stores/web \
        --tokenizer=sentencepiece:/data/sp.model

Files are read in order (a directory or glob expands sorted), tokenized by a pool of worker
processes (ordered, so the store does not depend on the worker count) and appended to the
store's arrays, whose chunk writes tensorstore runs concurrently. The manifest records the
tokenizer, the counts, what was skipped and a SHA-256 of every input file:

  - preparing the same inputs with the same tokenizer and options again finds an identical
    manifest and does nothing;
  - different inputs over an existing store need --overwrite (the old manifest is removed first);
  - an interrupted prepare leaves no manifest, so the store never looks complete.
"""

import argparse
import codecs
import collections
import datetime
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence

from jaxlm.data import readers, store
from jaxlm.data.documents import tokenize_texts
from jaxlm.data.tokenizers import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                                   resolve_tokenizer, token_dtype)
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")

_BATCH_CHARS = 1 << 21  # Text per worker task: large enough to amortise the pickling.


def _document_batches(files, stats: readers.ReadStats, options) -> Iterator[list[str]]:
  batch, size = [], 0
  for path in files:
    for document in readers.read_documents(path, stats=stats, **options):
      batch.append(document)
      size += len(document)
      if size >= _BATCH_CHARS:
        yield batch
        batch, size = [], 0
  if batch:
    yield batch


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer


def _tokenize_batch(texts: list[str]):
  return tokenize_texts(texts, _worker_tokenizer)


def _tokenized(batches, tokenizer, num_workers: int):
  """(token arrays, hashes) per batch, in order; at most 2 batches per worker in flight."""
  if num_workers <= 1:
    for texts in batches:
      yield tokenize_texts(texts, tokenizer)
    return
  # spawn, not fork: the parent runs tensorstore's threads, which fork does not copy safely.
  pool_context = multiprocessing.get_context("spawn")
  with pool_context.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
    pending = collections.deque()
    for texts in batches:
      pending.append(pool.apply_async(_tokenize_batch, (texts,)))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


_PARALLEL_BYTES = 64 << 20


def default_num_workers(tokenizer, input_bytes: int) -> int:
  """One process per core, except where starting them (~0.5 s each) or pickling documents to
  them costs more than it saves: byte tokenization (a memory copy) and small inputs."""
  if isinstance(tokenizer, ByteTokenizer) or input_bytes < _PARALLEL_BYTES:
    return 1
  return max(os.cpu_count() or 1, 1)


def prepare_data(inputs: str | Sequence[str], output: str, tokenizer=None, *,
                 file_format: str = "auto", field: str = "text", separator: str | None = None,
                 on_bad_utf8: str = "replace", name: str | None = None,
                 num_workers: int | None = None, overwrite: bool = False) -> dict:
  """Tokenizes `inputs` (files, directories, globs) into a store at `output` (a path or a
  tensorstore URL) and returns its manifest. See the module docstring for the guarantees."""
  tokenizer = resolve_tokenizer(tokenizer)
  files = readers.expand_paths(inputs, binding="--input")
  options = {"file_format": file_format, "field": field, "separator": separator,
             "on_bad_utf8": on_bad_utf8}
  if on_bad_utf8 not in readers.BAD_UTF8_POLICIES:
    raise UserError(f"on_bad_utf8 must be one of {readers.BAD_UTF8_POLICIES}, got "
                    f"{on_bad_utf8!r}")
  sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": readers.file_sha256(f)}
             for f in files]
  recipe = {
      "tokenizer": tokenizer.fingerprint,
      "inputs": [s["sha256"] for s in sources],  # Content and order; not where the files live.
      "options": options,
  }
  existing = store.read_manifest(output)
  if existing is not None:
    if existing.get("recipe") == recipe:
      logger.info("%s is already prepared from these inputs; nothing to do", output)
      return existing
    if not overwrite:
      raise UserError(f"{output} already holds a store prepared from other inputs, tokenizer or "
                      "options; pass --overwrite (overwrite=True) to replace it, or choose "
                      "another --output")

  writer = store.StoreWriter(output, token_dtype(tokenizer.vocab_size))
  stats = readers.ReadStats()
  workers = (num_workers if num_workers is not None else
             default_num_workers(tokenizer, sum(s["bytes"] for s in sources)))
  for tokens_list, hashes in _tokenized(_document_batches(files, stats, options), tokenizer,
                                        workers):
    writer.append(tokens_list, hashes)
  stats.log(f"prepare_data {output}")
  if writer.num_documents == 0:
    raise UserError(f"the inputs {list(map(str, files))} hold no text (empty files or every "
                    "document skipped); nothing was prepared")
  manifest = writer.finish({
      "name": name or os.path.basename(store.store_url(output).rstrip("/")),
      "recipe": recipe,
      "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                    "pad_id": getattr(tokenizer, "pad_id", 0)},
      "sources": sources,
      "read": {"files": stats.files, "documents": stats.documents, **stats.skips()},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  })
  logger.info("prepared %s: %d documents, %d tokens (%s)", manifest["name"],
              manifest["num_documents"], manifest["num_tokens"], store.store_url(output))
  return manifest


def tokenizer_from_flag(spec: str):
  """"byte", "sentencepiece:PATH" or "huggingface:PATH" -> a tokenizer."""
  kind, _, path = spec.partition(":")
  if kind == "byte" and not path:
    return ByteTokenizer()
  if kind == "sentencepiece" and path:
    return SentencePieceTokenizer(path)
  if kind in ("huggingface", "hf") and path:
    return HuggingFaceTokenizer(path)
  raise UserError(f"--tokenizer={spec!r}: use byte, sentencepiece:PATH or huggingface:PATH")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Tokenize text, JSON-lines and Parquet files "
                                   "into a jaxlm tokenized store.")
  parser.add_argument("--input", action="append", required=True,
                      help="a file, directory or glob; repeat for more")
  parser.add_argument("--output", required=True, help="a local path or a tensorstore URL")
  parser.add_argument("--tokenizer", default="byte",
                      help="byte (default), sentencepiece:PATH or huggingface:PATH")
  parser.add_argument("--format", default="auto", choices=readers.FORMATS,
                      help="auto: by extension (.jsonl/.json, .parquet, anything else is text)")
  parser.add_argument("--field", default="text", help="JSON-lines field / Parquet column")
  parser.add_argument("--separator", default=None,
                      help=r"split text files into documents on this (escapes allowed: '\n\n')")
  parser.add_argument("--on_bad_utf8", default="replace", choices=readers.BAD_UTF8_POLICIES)
  parser.add_argument("--name", default=None, help="the source name (default: output's name)")
  parser.add_argument("--num_workers", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  try:
    separator = (codecs.decode(args.separator, "unicode_escape")
                 if args.separator is not None else None)
    manifest = prepare_data(args.input, args.output, tokenizer_from_flag(args.tokenizer),
                            file_format=args.format, field=args.field, separator=separator,
                            on_bad_utf8=args.on_bad_utf8, name=args.name,
                            num_workers=args.num_workers, overwrite=args.overwrite)
  except UserError as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  print(f"{manifest['name']}: {manifest['num_documents']} documents, "
        f"{manifest['num_tokens']} tokens at {store.store_url(args.output)}")
  return 0
