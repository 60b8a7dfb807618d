"""Data: files -> tokens -> packed rows -> mixed, sharded batches by step; eval per domain.

tokenizers    text <-> ids: byte-level (default), SentencePiece, Hugging Face tokenizer.json
readers       documents from text, JSON-lines and Parquet files; bad input counted and logged
corpora       the built-in corpus built from the Python installation (stdlib code, prose)
documents     tokenized documents as spans of one token array; the hash-based train/valid split
store         the tensorstore-backed tokenized store and its manifest
prepare       prepare_data: files -> store, in parallel, idempotent (tools/prepare_data.py)
sources       named sources: builtin_corpus, text_files, jsonl_files, parquet_files,
              tokenized_store (seqio_source: a seqio Task or Mixture, optional)
packing       documents -> fixed-length rows with segment ids and positions, on demand
sampling      the grain sampling plan: per-source shuffles and the weighted interleave
batches       rows -> train batches by step (per host) and padded eval batches
pipeline      DataConfig, Datasets, build_datasets

Names are imported lazily, so `import jaxlm.data.prepare` does not pull in grain (and jax).
"""

import importlib

_EXPORTS = {
    "DataConfig": "pipeline", "Datasets": "pipeline", "build_datasets": "pipeline",
    "TrainBatches": "batches", "eval_batches": "batches", "make_examples": "batches",
    "PackedRows": "packing", "prepare_data": "prepare", "open_store": "store",
    "builtin_corpus": "sources", "text_files": "sources", "jsonl_files": "sources",
    "parquet_files": "sources", "tokenized_store": "sources", "seqio_source": "seqio_source",
    "ByteTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
    "HuggingFaceTokenizer": "tokenizers",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"jaxlm.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'jaxlm.data' has no attribute {name!r}")
