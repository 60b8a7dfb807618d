"""Reading documents from files: plain text, JSON lines and Parquet, with bad input counted.

One reader serves both the in-memory sources (sources.py) and prepare_data (prepare.py), so a text
file trains the same whether it is read directly or prepared into a store first.

Bad input is either a clear UserError (missing file, a glob that matches nothing, a Parquet file
or JSON-lines file without the field, malformed JSON) or a counted, logged skip (empty files,
documents with invalid UTF-8 under on_bad_utf8="skip", JSON lines without the field).
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")

FORMATS = ("auto", "text", "jsonl", "parquet")
BAD_UTF8_POLICIES = ("replace", "skip")


@dataclasses.dataclass
class ReadStats:
  """What a read saw; `log` reports the skips so that none is silent."""
  files: int = 0
  documents: int = 0
  empty_files: int = 0
  bad_utf8_replaced: int = 0  # Documents kept with U+FFFD in place of invalid bytes.
  bad_utf8_skipped: int = 0  # Documents dropped for invalid bytes.
  missing_field_skipped: int = 0  # JSON lines without the field.

  def skips(self) -> dict[str, int]:
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k not in ("files", "documents") and v}

  def log(self, what: str) -> None:
    logger.info("%s: %d documents from %d files", what, self.documents, self.files)
    for kind, count in self.skips().items():
      logger.warning("%s: %s = %d", what, kind, count)


def _has_glob_magic(path: str) -> bool:
  return any(c in path for c in "*?[")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike],
                 binding: str = "text_files.paths") -> list[pathlib.Path]:
  """Paths, directories (all files under them, sorted) and globs (`**` allowed) -> files, in
  order, each once."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(os.fspath, paths):
    if _has_glob_magic(path):
      matches = [pathlib.Path(p) for p in sorted(glob.glob(path, recursive=True))]
      found = [p for p in matches if p.is_file()]
      if not found:
        raise UserError(f"the glob {path!r} matches no files; check the pattern in {binding}")
    elif pathlib.Path(path).is_dir():
      found = sorted(f for f in pathlib.Path(path).rglob("*") if f.is_file())
      if not found:
        raise UserError(f"the directory {path!r} contains no files; check {binding}")
    elif pathlib.Path(path).is_file():
      found = [pathlib.Path(path)]
    else:
      raise UserError(f"input file {path!r} does not exist; fix {binding}")
    files.extend(found)
  return list(dict.fromkeys(files))


def detect_format(path: pathlib.Path) -> str:
  suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
  suffix = suffixes[-1] if suffixes else ""
  if suffix in (".jsonl", ".json", ".ndjson"):
    return "jsonl"
  if suffix in (".parquet", ".pq"):
    return "parquet"
  return "text"


def decode_document(data: bytes, on_bad_utf8: str, stats: ReadStats) -> str | None:
  """UTF-8 text, or None when the document is to be skipped."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    if on_bad_utf8 == "skip":
      stats.bad_utf8_skipped += 1
      return None
    stats.bad_utf8_replaced += 1
    return data.decode("utf-8", errors="replace")


def _open_bytes(path: pathlib.Path):
  return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _text_documents(path, separator, on_bad_utf8, stats) -> Iterator[str]:
  with _open_bytes(path) as f:
    data = f.read()
  # Split as bytes, so one bad byte costs one document, not the whole file.
  pieces = [data] if separator is None else data.split(separator.encode("utf-8"))
  for piece in pieces:
    if piece:
      text = decode_document(piece, on_bad_utf8, stats)
      if text is not None:
        yield text


def _jsonl_documents(path, field, on_bad_utf8, stats) -> Iterator[str]:
  lines_with_field = lines = 0
  with _open_bytes(path) as f:
    for line_number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      lines += 1
      line = decode_document(raw, on_bad_utf8, stats)
      if line is None:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_number} is not valid JSON ({e.msg}); fix or remove the "
                        "line") from None
      if not isinstance(record, dict) or field not in record:
        stats.missing_field_skipped += 1
        continue
      lines_with_field += 1
      value = record[field]
      if not isinstance(value, str):
        raise UserError(f"{path}:{line_number}: field {field!r} is a {type(value).__name__}, not "
                        "a string; choose a text field")
      if value:
        yield value
  if lines and not lines_with_field:
    raise UserError(f"no line of the JSON-lines file {path} has the field {field!r}; set the "
                    "field (e.g. --field=content or jsonl_files.field)")


def _parquet_documents(path, field, on_bad_utf8, stats) -> Iterator[str]:
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("reading Parquet files needs pyarrow: pip install 'jaxlm[parquet]'") from None
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise UserError(f"{path} is not a readable Parquet file ({e})") from None
  columns = parquet.schema_arrow.names
  if field not in columns:
    raise UserError(f"the Parquet file {path} has no column {field!r}; its columns are "
                    f"{columns}; set the field (e.g. --field={columns[0]})")
  column_type = parquet.schema_arrow.field(field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or
          pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)):
    raise UserError(f"column {field!r} of {path} holds {column_type}, not text; choose a text "
                    "column")
  for batch in parquet.iter_batches(columns=[field], batch_size=4096):
    # As binary, so invalid UTF-8 meets the same policy as in text files.
    for value in batch.column(0).cast(pa.large_binary()).to_pylist():
      if value:
        text = decode_document(value, on_bad_utf8, stats)
        if text is not None:
          yield text


def read_documents(path: pathlib.Path, *, file_format: str = "auto", field: str = "text",
                   separator: str | None = None, on_bad_utf8: str = "replace",
                   stats: ReadStats | None = None) -> Iterator[str]:
  """The non-empty documents of one file, in order.

  Text files are one document each, or split on `separator`; JSON-lines files give one document
  per line (its `field`), Parquet files one per row (column `field`).
  """
  if on_bad_utf8 not in BAD_UTF8_POLICIES:
    raise UserError(f"on_bad_utf8 must be one of {BAD_UTF8_POLICIES}, got {on_bad_utf8!r}")
  if file_format not in FORMATS:
    raise UserError(f"file_format must be one of {FORMATS}, got {file_format!r}")
  stats = stats if stats is not None else ReadStats()
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"input file {str(path)!r} does not exist")
  stats.files += 1
  if path.stat().st_size == 0:
    stats.empty_files += 1
    return
  kind = detect_format(path) if file_format == "auto" else file_format
  if kind == "text":
    documents = _text_documents(path, separator, on_bad_utf8, stats)
  elif kind == "jsonl":
    documents = _jsonl_documents(path, field, on_bad_utf8, stats)
  else:
    documents = _parquet_documents(path, field, on_bad_utf8, stats)
  for document in documents:
    stats.documents += 1
    yield document


def read_all(files: Sequence[pathlib.Path], what: str, **options) -> list[str]:
  """Every document of every file, with the skips logged under `what`."""
  stats = ReadStats()
  documents = [d for f in files for d in read_documents(f, stats=stats, **options)]
  stats.log(what)
  return documents


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()

