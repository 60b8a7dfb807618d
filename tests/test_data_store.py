"""prepare_data and the tokenized store: contents, manifest, idempotence, interruption, URLs."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import prepare, store
from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.prepare import main as prepare_main
from jaxlm.data.prepare import prepare_data
from jaxlm.data.sources import text_files, tokenized_store
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError

DOCUMENTS = [f"document {i}: " + "lorem ipsum ✓ " * (i % 9 + 1) for i in range(300)]


@pytest.fixture
def inputs(tmp_path):
  """The documents spread over a text file (blank-line separated), a JSON-lines file and an
  empty file, in that (sorted) order."""
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "a.txt").write_text("\n\n".join(DOCUMENTS[:100]))
  (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[100:]))
  (folder / "c.txt").write_text("")
  return folder


def stored_texts(path):
  documents = store.open_store(path).documents
  return [ByteTokenizer().decode(documents.document(d)) for d in range(documents.num_documents)]


def test_prepare_writes_documents_with_boundaries_and_a_manifest(inputs, tmp_path):
  out = tmp_path / "store"
  manifest = prepare_data(str(inputs), str(out), separator="\n\n", name="lorem")
  assert stored_texts(out) == DOCUMENTS
  assert manifest["num_documents"] == 300 and manifest["name"] == "lorem"
  assert manifest["num_tokens"] == sum(len(d.encode()) for d in DOCUMENTS)
  assert manifest["tokenizer"]["fingerprint"] == "byte-v1" and manifest["token_dtype"] == "uint16"
  assert [pathlib.Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "b.jsonl",
                                                                          "c.txt"]
  assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
  assert manifest["read"]["empty_files"] == 1
  assert json.loads((out / "manifest.json").read_text()) == manifest
  assert tokenized_store(str(out)).name == "lorem"


def test_preparing_twice_is_idempotent_and_other_inputs_need_overwrite(inputs, tmp_path,
                                                                        monkeypatch):
  out = str(tmp_path / "store")
  first = prepare_data(str(inputs), out, separator="\n\n")

  def must_not_write(*args, **kwargs):
    raise AssertionError("prepared again")
  with monkeypatch.context() as patch:
    patch.setattr(store, "StoreWriter", must_not_write)
    assert prepare_data(str(inputs), out, separator="\n\n") == first
  (inputs / "a.txt").write_text("changed")
  with pytest.raises(UserError, match="--overwrite"):
    prepare_data(str(inputs), out, separator="\n\n")
  assert store.read_manifest(out) == first  # Refusing touched nothing.
  second = prepare_data(str(inputs), out, separator="\n\n", overwrite=True)
  assert second["num_documents"] == 201 and stored_texts(out)[0] == "changed"


def test_an_interrupted_prepare_never_leaves_a_store_that_looks_complete(inputs, tmp_path,
                                                                         monkeypatch):
  out = str(tmp_path / "store")
  prepare_data(str(inputs), out, separator="\n\n")
  (inputs / "a.txt").write_text("new text")

  def crash(texts, tokenizer):
    raise KeyboardInterrupt
  monkeypatch.setattr(prepare, "tokenize_texts", crash)
  with pytest.raises(KeyboardInterrupt):
    prepare_data(str(inputs), out, separator="\n\n", overwrite=True)
  assert store.read_manifest(out) is None
  with pytest.raises(UserError, match="not a complete tokenized store"):
    build_datasets(DataConfig(source=tokenized_store(out)))
  monkeypatch.undo()
  assert prepare_data(str(inputs), out, separator="\n\n")["num_documents"] == 201


def test_a_store_trains_exactly_like_the_text_it_was_prepared_from(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("\n".join(DOCUMENTS))
  prepare_data(str(path), str(tmp_path / "store"), separator="\n")
  common = dict(seq_len=32, batch_size=4, max_eval_batches=None)
  from_text = build_datasets(DataConfig(source=text_files(str(path), separator="\n", name="t"),
                                        **common))
  from_store = build_datasets(DataConfig(source=tokenized_store(str(tmp_path / "store"),
                                                                name="t"), **common))
  for step in (0, 1, 17, 500):
    for key, value in from_text.train.batch_at(step).items():
      np.testing.assert_array_equal(value, from_store.train.batch_at(step)[key])
  for a, b in zip(from_text.eval["t"], from_store.eval["t"], strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_a_url_store_works_the_same_as_a_path(inputs, tmp_path):
  prepare_data(str(inputs), "memory://stores/lorem", separator="\n\n")
  assert stored_texts("memory://stores/lorem") == DOCUMENTS
  url = (tmp_path / "via_url").as_uri()
  prepare_data(str(inputs), url, separator="\n\n")
  assert stored_texts(str(tmp_path / "via_url")) == DOCUMENTS  # The same place.


def test_parallel_workers_write_the_same_store(inputs, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "_BATCH_CHARS", 2000)  # Many small tasks.
  one = prepare_data(str(inputs), str(tmp_path / "one"), separator="\n\n", num_workers=1)
  two = prepare_data(str(inputs), str(tmp_path / "two"), separator="\n\n", num_workers=2)
  assert one["num_tokens"] == two["num_tokens"] and stored_texts(tmp_path / "two") == DOCUMENTS


def test_a_store_refuses_a_different_tokenizer(inputs, tmp_path):
  prepare_data(str(inputs), str(tmp_path / "store"), separator="\n\n")

  class OtherTokenizer(ByteTokenizer):
    fingerprint = "other"
  with pytest.raises(UserError, match="was tokenized with byte-v1"):
    build_datasets(DataConfig(source=tokenized_store(str(tmp_path / "store")),
                              tokenizer=OtherTokenizer()))


def test_prepare_data_command_line(inputs, tmp_path, capsys):
  out = tmp_path / "cli"
  assert prepare_main([f"--input={inputs / 'a.txt'}", f"--output={out}",
                       r"--separator=\n\n"]) == 0
  assert "100 documents" in capsys.readouterr().out
  assert prepare_main([f"--input={tmp_path / 'missing'}", f"--output={out}"]) == 2
  assert "prepare_data: error: input file" in capsys.readouterr().err
  assert prepare_main([f"--input={inputs / 'c.txt'}", f"--output={tmp_path / 'x'}"]) == 2
  assert "hold no text" in capsys.readouterr().err
  assert prepare_main([f"--input={inputs}", f"--output={out}", "--tokenizer=bpe"]) == 2


def test_preparing_data_imports_neither_grain_nor_jax():
  code = ("import sys, jaxlm.data.prepare, jaxlm.data.tokenizer_training; "
          "assert not {'grain', 'jax'} & set(sys.modules), 'grain or jax imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
