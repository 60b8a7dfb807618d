"""Sources: named collections of documents, each one domain of a mixture and of evaluation.

A source is a small description (what to read, its name) that `load(tokenizer)` turns into
tokenized train documents and, when it has its own, validation documents; otherwise the pipeline
splits a validation set off by DataConfig.valid_fraction. Every source gets its own validation
set, so evaluation reports loss and bits per byte per domain.

  builtin_corpus(domains)            the no-download corpus (corpora.py)
  text_files(paths, separator)       UTF-8 text: one document per file, or split on separator
  jsonl_files(paths, field)          one document per JSON line
  parquet_files(paths, field)        one document per row (needs pyarrow)
  tokenized_store(path)              a store made by tools/prepare_data.py (store.py)
  seqio_source(task)                 a registered seqio Task or Mixture (seqio_source.py)

The file sources read and tokenize in memory at start-up, which suits up to a few hundred MB;
beyond that, prepare a store once and train from it.
"""

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Protocol

import gin

from jaxlm.data import corpora, readers
from jaxlm.data.documents import TokenizedDocuments, tokenize_documents
from jaxlm.data.store import open_store, read_manifest, store_url
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")


@dataclasses.dataclass(frozen=True)
class LoadedSource:
  name: str
  train: TokenizedDocuments
  valid: TokenizedDocuments | None  # None: split off train by DataConfig.valid_fraction.


class Source(Protocol):
  name: str

  def load(self, tokenizer) -> LoadedSource:
    ...


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Documents produced by `read` (and `read_valid`), tokenized in memory."""
  name: str
  read: Callable[[], Sequence[str]]
  read_valid: Callable[[], Sequence[str]] | None = None

  def load(self, tokenizer) -> LoadedSource:
    train = tokenize_documents(list(self.read()), tokenizer)
    valid = (tokenize_documents(list(self.read_valid()), tokenizer)
             if self.read_valid is not None else None)
    return LoadedSource(self.name, train, valid)


def documents_source(documents: Sequence[str], name: str = "text",
                     valid_documents: Sequence[str] | None = None) -> TextSource:
  """A source over documents already in memory."""
  documents = list(documents)
  valid = list(valid_documents) if valid_documents is not None else None
  return TextSource(name, lambda: documents, (lambda: valid) if valid is not None else None)


@gin.configurable
def builtin_corpus(domains: Sequence[str] = ("code", "prose"),
                   name: str | None = None) -> TextSource:
  """The no-download corpus: the given built-in domains' documents, in the given order. Named
  after its domains ("code+prose") unless given a name."""
  domains = (domains,) if isinstance(domains, str) else tuple(domains)
  for domain in domains:
    if domain not in corpora.DOMAINS:
      raise UserError(f"unknown built-in corpus domain {domain!r}; choose from "
                      f"{list(corpora.DOMAINS)}")

  def read():
    return [d for domain in domains for d in corpora.builtin_documents(domain)]
  return TextSource(name or "+".join(domains), read)


def _file_source(paths, valid_paths, name, binding, **options) -> TextSource:
  files = readers.expand_paths(paths, binding=f"{binding}.paths")
  valid_files = (readers.expand_paths(valid_paths, binding=f"{binding}.valid_paths")
                 if valid_paths is not None else None)
  if options["on_bad_utf8"] not in readers.BAD_UTF8_POLICIES:
    raise UserError(f"{binding}.on_bad_utf8 must be one of {readers.BAD_UTF8_POLICIES}, got "
                    f"{options['on_bad_utf8']!r}")
  return TextSource(
      name, lambda: readers.read_all(files, f"source {name!r}", **options),
      (lambda: readers.read_all(valid_files, f"source {name!r} (valid)", **options))
      if valid_files is not None else None)


@gin.configurable
def text_files(paths: str | Sequence[str] = gin.REQUIRED, separator: str | None = None,
               name: str = "text", valid_paths: str | Sequence[str] | None = None,
               on_bad_utf8: str = "replace") -> TextSource:
  """UTF-8 text files.

  Args:
    paths: a path or list of paths; each is a file, a directory (all files under it,
      recursively, sorted) or a glob (`**` allowed). A file named twice is read once.
    separator: None makes each file one document; otherwise each file is split on it and empty
      pieces are dropped.
    name: the domain name in mixtures and evaluation.
    valid_paths: files holding this source's validation documents (else a split of `paths`).
    on_bad_utf8: "replace" invalid bytes with U+FFFD or "skip" the document; either is counted
      and logged.
  """
  return _file_source(paths, valid_paths, name, "text_files", file_format="text",
                      separator=separator, on_bad_utf8=on_bad_utf8)


# The small real corpora beside the repository (../shared/corpora, its README lists the domains).
SHARED_CORPORA_ENV = "JAXLM_SHARED_CORPORA"


def shared_corpora_dir() -> str:
  """$JAXLM_SHARED_CORPORA; else ../shared/corpora beside the repository, if it is there; else
  the cache that `python tools/fetch_corpora.py` fills (~/.cache/jaxlm/corpora)."""
  if os.environ.get(SHARED_CORPORA_ENV):
    return os.environ[SHARED_CORPORA_ENV]
  beside = pathlib.Path(__file__).resolve().parents[3] / "shared" / "corpora"
  return str(beside) if beside.is_dir() else corpora_cache_dir()


def corpora_cache_dir() -> str:
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "jaxlm", "corpora")


@gin.configurable
def shared_corpus(domain: str = gin.REQUIRED, name: str | None = None,
                  directory: str | None = None) -> TextSource:
  """One domain of the shared real corpora (tinystories, wikitext2, french, ...): its train.txt,
  validated on its valid.txt, each file one document. `directory`: the corpora folder (default
  $JAXLM_SHARED_CORPORA, else ../shared/corpora beside the repository). Optional: nothing else
  in jaxlm reads them."""
  root = directory or shared_corpora_dir()
  train = os.path.join(root, domain, "train.txt")
  if not os.path.isfile(train):
    raise UserError(f"shared corpus {domain!r} not found ({train} does not exist); fetch it "
                    f"with `python tools/fetch_corpora.py`, or set ${SHARED_CORPORA_ENV} or "
                    "shared_corpus.directory to the corpora folder")
  return _file_source(train, os.path.join(root, domain, "valid.txt"), name or domain,
                      "shared_corpus", file_format="text", separator=None, on_bad_utf8="replace")


@gin.configurable
def jsonl_files(paths: str | Sequence[str] = gin.REQUIRED, field: str = "text",
                name: str = "jsonl", valid_paths: str | Sequence[str] | None = None,
                on_bad_utf8: str = "replace") -> TextSource:
  """JSON-lines files (optionally .gz): one document per line, from its `field`."""
  return _file_source(paths, valid_paths, name, "jsonl_files", file_format="jsonl", field=field,
                      on_bad_utf8=on_bad_utf8)


@gin.configurable
def parquet_files(paths: str | Sequence[str] = gin.REQUIRED, field: str = "text",
                  name: str = "parquet", valid_paths: str | Sequence[str] | None = None,
                  on_bad_utf8: str = "replace") -> TextSource:
  """Parquet files: one document per row, from column `field` (needs pyarrow)."""
  return _file_source(paths, valid_paths, name, "parquet_files", file_format="parquet",
                      field=field, on_bad_utf8=on_bad_utf8)


@dataclasses.dataclass(frozen=True)
class StoreSource:
  """A tokenized store; its tokens are read on demand, never loaded whole."""
  name: str
  path: str
  valid_path: str | None = None

  def load(self, tokenizer) -> LoadedSource:
    train = self._open(self.path, tokenizer)
    valid = self._open(self.valid_path, tokenizer) if self.valid_path is not None else None
    return LoadedSource(self.name, train, valid)

  def _open(self, path: str, tokenizer) -> TokenizedDocuments:
    store = open_store(path)
    prepared_with = store.manifest["tokenizer"]["fingerprint"]
    if prepared_with != tokenizer.fingerprint:
      raise UserError(f"the store {store.url} was tokenized with {prepared_with}, but "
                      f"DataConfig.tokenizer is {tokenizer.fingerprint}; prepare it with this "
                      "tokenizer or set DataConfig.tokenizer to match")
    logger.info("source %r: store %s (%d documents, %d tokens)", self.name, store.url,
                store.manifest["num_documents"], store.manifest["num_tokens"])
    return store.documents


@gin.configurable
def tokenized_store(path: str = gin.REQUIRED, valid_path: str | None = None,
                    name: str | None = None) -> StoreSource:
  """A store prepared by tools/prepare_data.py, at a local path or a tensorstore URL. Named as
  it was prepared (--name, default the store's directory name) unless given a name."""
  if name is None:
    manifest = read_manifest(path)
    name = (manifest or {}).get("name") or os.path.basename(store_url(path).rstrip("/"))
  return StoreSource(name, os.fspath(path), valid_path)


def as_sources(value, binding: str = "DataConfig.source") -> list:
  """A source, a list of them, a list of document strings, or a callable giving any of these
  (`@text_files` unevaluated, `lambda: [...]`) -> a list of sources."""
  if callable(value) and not hasattr(value, "load"):
    value = value()
  if hasattr(value, "load"):
    return [value]
  if isinstance(value, str):
    raise UserError(f"{binding} is the string {value[:40]!r}; bind a source such as "
                    "@text_files() or @tokenized_store()")
  items = list(value)
  if all(isinstance(item, str) for item in items):
    return [documents_source(items)]
  return [source for item in items for source in as_sources(item, binding)]
