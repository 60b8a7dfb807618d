"""Document sources: gin-configurable functions that return a list of documents (strings).

A data config names a source (`DataConfig.source = @text_files`) and the pipeline calls it with no
arguments, so every source's arguments are bound in gin.
"""

import glob
import hashlib
import os
import pathlib
from collections.abc import Sequence

import gin

from jaxlm.data import corpora
from jaxlm.errors import UserError


@gin.configurable
def builtin_corpus(domains: Sequence[str] = ('code', 'prose')) -> list[str]:
  """The no-download corpus: the given built-in domains' documents, in the given order."""
  if isinstance(domains, str):
    domains = (domains,)
  documents = []
  for domain in domains:
    documents.extend(corpora.builtin_documents(domain))
  return documents


def _has_glob_magic(path: str) -> bool:
  return any(c in path for c in '*?[')


def _expand_path(path: str) -> list[pathlib.Path]:
  """One path, directory or glob -> the sorted files it names."""
  if _has_glob_magic(path):
    matches = sorted(pathlib.Path(p) for p in glob.glob(path, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
      raise UserError(f'the glob {path!r} matches no files; check the pattern in text_files.paths')
    return files
  p = pathlib.Path(path)
  if p.is_dir():
    files = sorted(f for f in p.rglob('*') if f.is_file())
    if not files:
      raise UserError(f'the directory {path!r} contains no files; check text_files.paths')
    return files
  if p.is_file():
    return [p]
  raise UserError(f'text file {path!r} does not exist; fix text_files.paths')


@gin.configurable
def text_files(paths: str | Sequence[str] = gin.REQUIRED,
               separator: str | None = None) -> list[str]:
  """Documents read from UTF-8 text files.

  Args:
    paths: a path or list of paths; each is a file, a directory (all files under it,
      recursively, sorted) or a glob (`**` allowed). A file named twice is read once.
    separator: None makes each file one document (no assumption about its layout);
      otherwise each file is split on it and empty pieces are dropped.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in paths:
    files.extend(_expand_path(os.fspath(path)))
  files = list(dict.fromkeys(files))  # Deduplicated, order kept.
  documents = []
  for f in files:
    text = f.read_text(encoding='utf-8', errors='replace')
    if separator is None:
      documents.append(text)
    else:
      documents.extend(piece for piece in text.split(separator) if piece)
  return documents


def _split_key(text: str, seed: int) -> int:
  digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8,
                           salt=seed.to_bytes(8, 'little', signed=True)).digest()
  return int.from_bytes(digest, 'little')


def split_train_valid(documents: Sequence[str], valid_fraction: float,
                      seed: int) -> tuple[list[str], list[str]]:
  """Splits documents into disjoint (train, valid) lists, deterministically.

  Documents are ranked by a seeded hash of their text and the lowest-ranked
  round(valid_fraction * n) (at least 1, at most n - 1) go to valid, so the split does not depend
  on document order and identical documents always land on the same side. Both lists keep the
  input order. A single document is cut at character (1 - valid_fraction) * len instead, so a
  one-file corpus still gets a held-out tail.
  """
  if not 0.0 < valid_fraction < 1.0:
    raise UserError(f'valid_fraction must be in (0, 1), got {valid_fraction}; '
                    'e.g. set DataConfig.valid_fraction = 0.02')
  documents = list(documents)
  if len(documents) == 1:
    text = documents[0]
    cut = min(max(round(len(text) * (1.0 - valid_fraction)), 1), len(text) - 1)
    return [text[:cut]], [text[cut:]]
  if not documents:
    return [], []
  keys = [_split_key(text, seed) for text in documents]
  num_valid = min(max(round(valid_fraction * len(documents)), 1), len(documents) - 1)
  threshold = sorted(keys)[num_valid - 1]
  train = [d for d, k in zip(documents, keys) if k > threshold]
  valid = [d for d, k in zip(documents, keys) if k <= threshold]
  return train, valid
