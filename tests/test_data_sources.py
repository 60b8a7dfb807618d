"""Sources and readers: text, JSON lines, Parquet, the built-in corpus, bad input, the split."""

import gzip
import json
import logging
import sys

import numpy as np
import pytest

from jaxlm.data import corpora, readers
from jaxlm.data.documents import from_token_lists, split_train_valid, tokenize_documents
from jaxlm.data.sources import (as_sources, builtin_corpus, jsonl_files, parquet_files,
                                text_files)
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError

BAD = b"caf\xe9 au lait"  # Latin-1, not UTF-8.


def texts(source):
  return list(source.read())


def test_text_files_reads_dirs_globs_and_single_paths(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("bee\n\n\nbuzz\n\n\n")
  (tmp_path / "sub" / "a.txt").write_text("ant ✓")
  assert texts(text_files(str(tmp_path))) == ["bee\n\n\nbuzz\n\n\n", "ant ✓"]
  assert texts(text_files(str(tmp_path / "**" / "*.txt"))) == ["bee\n\n\nbuzz\n\n\n", "ant ✓"]
  assert texts(text_files([str(tmp_path / "b.txt"), str(tmp_path)], separator="\n\n\n")) == [
      "bee", "buzz", "ant ✓"]  # b.txt named twice, read once.
  with pytest.raises(UserError, match="does not exist"):
    text_files(str(tmp_path / "missing.txt"))
  with pytest.raises(UserError, match="matches no files"):
    text_files(str(tmp_path / "*.json"))


def test_bad_utf8_is_replaced_or_skipped_counted_and_logged(tmp_path, caplog):
  (tmp_path / "a.txt").write_bytes(b"good one\n" + BAD + b"\nalso good")
  caplog.set_level(logging.INFO, logger="jaxlm")
  replaced = texts(text_files(str(tmp_path / "a.txt"), separator="\n"))
  assert replaced == ["good one", "caf\ufffd au lait", "also good"]
  assert "bad_utf8_replaced = 1" in caplog.text
  skipped = texts(text_files(str(tmp_path / "a.txt"), separator="\n", on_bad_utf8="skip"))
  assert skipped == ["good one", "also good"]
  assert "bad_utf8_skipped = 1" in caplog.text
  with pytest.raises(UserError, match="on_bad_utf8"):
    text_files(str(tmp_path / "a.txt"), on_bad_utf8="ignore")


def test_empty_files_are_counted_skips_and_an_all_empty_source_an_error(tmp_path, caplog):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "full.txt").write_text("text")
  caplog.set_level(logging.INFO, logger="jaxlm")
  assert texts(text_files(str(tmp_path))) == ["text"]
  assert "empty_files = 1" in caplog.text
  documents = tokenize_documents(texts(text_files(str(tmp_path / "empty.txt"))), ByteTokenizer())
  with pytest.raises(UserError, match="has no text"):
    split_train_valid(documents, 0.1, seed=0)


def test_jsonl_field_gzip_and_bad_lines(tmp_path, caplog):
  lines = [{"text": "first"}, {"content": "no text field"}, {"text": "second", "id": 2}]
  (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "zipped"}) + "\n")
  caplog.set_level(logging.INFO, logger="jaxlm")
  assert texts(jsonl_files(str(tmp_path / "*.jsonl*"))) == ["first", "second", "zipped"]
  assert "missing_field_skipped = 1" in caplog.text
  assert texts(jsonl_files(str(tmp_path / "a.jsonl"), field="content")) == ["no text field"]
  with pytest.raises(UserError, match="has the field 'body'"):
    texts(jsonl_files(str(tmp_path / "a.jsonl"), field="body"))
  (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": unquoted}\n')
  with pytest.raises(UserError, match=r"broken.jsonl:2 is not valid JSON"):
    texts(jsonl_files(str(tmp_path / "broken.jsonl")))
  (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
  with pytest.raises(UserError, match="not a string"):
    texts(jsonl_files(str(tmp_path / "number.jsonl")))


def test_parquet_rows_and_a_file_without_the_field(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.table({"text": ["row one", "", "row ✓ three"], "n": [1, 2, 3]}),
                 tmp_path / "a.parquet")
  assert texts(parquet_files(str(tmp_path / "a.parquet"))) == ["row one", "row ✓ three"]
  with pytest.raises(UserError, match=r"has no column 'body'; its columns are \['text', 'n'\]"):
    texts(parquet_files(str(tmp_path / "a.parquet"), field="body"))
  with pytest.raises(UserError, match="not text"):
    texts(parquet_files(str(tmp_path / "a.parquet"), field="n"))
  pq.write_table(pa.table({"text": pa.array([b"ok", BAD], pa.binary())}), tmp_path / "b.parquet")
  assert texts(parquet_files(str(tmp_path / "b.parquet"), on_bad_utf8="skip")) == ["ok"]
  (tmp_path / "c.parquet").write_text("not parquet")
  with pytest.raises(UserError, match="not a readable Parquet file"):
    texts(parquet_files(str(tmp_path / "c.parquet")))


def test_as_sources_accepts_every_legacy_form():
  assert [s.name for s in as_sources(["a doc", "another"])] == ["text"]
  assert texts(as_sources(lambda: ["x", "y"])[0]) == ["x", "y"]
  assert [s.name for s in as_sources([builtin_corpus(("code",)), builtin_corpus(("prose",))])] \
      == ["code", "prose"]
  assert as_sources(builtin_corpus)[0].name == "code+prose"
  with pytest.raises(UserError, match="bind a source"):
    as_sources("/data/file.txt")


def test_builtin_corpus_builds_and_then_reads_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
  code = corpora.builtin_documents("code")
  prose = corpora.builtin_documents("prose")
  assert len(code) > 100 and any("def " in d for d in code)
  assert len(prose) > 10 and all(prose)
  assert texts(builtin_corpus()) == code + prose and texts(builtin_corpus(("prose",))) == prose
  names = sorted(p.name for p in tmp_path.iterdir())
  assert len(names) == 2 and all(sys.version.split()[0] in n for n in names)  # No .tmp left.

  def must_not_build():
    raise AssertionError("rebuilt instead of reading the cache")
  monkeypatch.setitem(corpora._BUILDERS, "code", must_not_build)
  assert corpora.builtin_documents("code") == code
  with pytest.raises(UserError, match="unknown built-in corpus domain"):
    builtin_corpus(("poetry",))


def test_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch):
  def crash(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(corpora.os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    corpora.builtin_documents("prose", cache_dir=tmp_path)
  assert not list(tmp_path.iterdir())


def _split_texts(documents, fraction, seed):
  tokenizer = ByteTokenizer()
  train, valid = split_train_valid(tokenize_documents(documents, tokenizer), fraction, seed)
  decode = lambda docs: [tokenizer.decode(docs.document(d)) for d in range(docs.num_documents)]
  return decode(train), decode(valid)


def test_split_train_valid_is_disjoint_deterministic_and_order_free():
  documents = [f"doc {i}" for i in range(200)]
  train, valid = _split_texts(documents, 0.1, seed=0)
  assert len(valid) == 20 and not set(train) & set(valid)
  assert sorted(train + valid) == sorted(documents)
  assert (train, valid) == _split_texts(documents, 0.1, seed=0)
  assert _split_texts(documents, 0.1, seed=1)[1] != valid
  assert _split_texts(documents[::-1], 0.1, seed=0)[1] == valid[::-1]
  train, valid = _split_texts(["same", "same", "other", "x", "y"], 0.2, seed=0)
  assert not set(train) & set(valid)
  assert _split_texts(["a", "b", "c"], 0.01, seed=0)[1]  # Never empty.
  with pytest.raises(UserError, match="all the same text"):
    _split_texts(["same"] * 4, 0.2, seed=0)


def test_split_one_document_cuts_its_tail_and_bad_fractions_fail():
  assert _split_texts(["abcdefghij"], 0.2, seed=0) == (["abcdefgh"], ["ij"])
  documents = from_token_lists([np.arange(3, 13), np.arange(3, 5)])
  for fraction in (0.0, 1.0, -0.5):
    with pytest.raises(UserError, match="valid_fraction"):
      split_train_valid(documents, fraction, seed=0)


def test_read_documents_rejects_a_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    list(readers.read_documents(tmp_path / "nope.txt"))
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(UserError, match="file_format"):
    list(readers.read_documents(tmp_path / "a.txt", file_format="csv"))
