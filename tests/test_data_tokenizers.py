"""Tokenizers: byte-level, SentencePiece (trained here, offline) and Hugging Face tokenizer.json."""

import pathlib
import pickle
import textwrap

import gin
import numpy as np
import pytest

from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.tokenizer_training import main as train_tokenizer_main
from jaxlm.data.tokenizer_training import train_sentencepiece
from jaxlm.data.tokenizers import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                                   resolve_tokenizer)
from jaxlm.errors import UserError
from hf_fixtures import train_bpe_tokenizer

TRICKY = "héllo wörld ✓ 日本語 \n\t  indented\n\n\nx = 42  # 3.14\r\n\x00end"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def sp_model(corpus_file, tmp_path_factory):
  return train_sentencepiece(str(corpus_file), tmp_path_factory.mktemp("sp") / "sp.model", 400)


def test_byte_tokenizer_round_trips_unicode():
  tok = ByteTokenizer()
  ids = tok.encode(TRICKY)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tok.vocab_size
  assert len(ids) == len(TRICKY.encode("utf-8"))
  assert tok.decode(ids) == TRICKY
  assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id, 999]) == "ab"
  lengths = tok.byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths[:3].sum() == 0
  assert lengths[ids].sum() == len(TRICKY.encode("utf-8"))


def test_sentencepiece_model_is_lossless_with_exact_byte_lengths(sp_model, corpus_file):
  tok = SentencePieceTokenizer(sp_model)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 400)
  text = corpus_file.read_text()[:3000] + TRICKY
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) < len(text.encode("utf-8"))  # It compresses.
  assert tok.decode(ids) == text  # Identity normalisation + byte fallback: lossless.
  assert tok.byte_lengths()[ids].sum() == len(text.encode("utf-8"))
  assert tok.decode([tok.bos_id, *tok.encode("abc"), tok.eos_id, -1, 10**6]) == "abc"
  batch = tok.encode_batch(["abc", "", "def"])
  assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in ("abc", "", "def")]
  clone = pickle.loads(pickle.dumps(tok))  # Worker processes receive it pickled.
  assert clone.encode(text).tolist() == ids.tolist() and clone.fingerprint == tok.fingerprint


def test_train_tokenizer_cli(corpus_file, tmp_path, capsys):
  out = tmp_path / "m" / "tok.model"
  assert train_tokenizer_main([f"--input={corpus_file}", f"--output={out}",
                               "--vocab_size=420", "--model_type=unigram"]) == 0
  assert SentencePieceTokenizer(out).vocab_size == 420
  assert not [p for p in out.parent.iterdir() if p.suffix == ".tmp"]
  assert train_tokenizer_main([f"--input={tmp_path / 'missing.txt'}", f"--output={out}"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_huggingface_tokenizer_json(corpus_file, tmp_path):
  path = tmp_path / "tokenizer.json"
  train_bpe_tokenizer(path, corpus_file)
  tok = HuggingFaceTokenizer(path)
  assert HuggingFaceTokenizer(tmp_path).fingerprint == tok.fingerprint  # A model directory.
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = tok.encode(TRICKY)
  assert tok.decode(ids) == TRICKY
  assert tok.byte_lengths()[ids].sum() == len(TRICKY.encode("utf-8"))
  assert tok.byte_lengths()[[0, 1, 2]].sum() == 0
  assert pickle.loads(pickle.dumps(tok)).encode(TRICKY).tolist() == ids.tolist()
  with pytest.raises(UserError, match="no bos token.*set huggingface_tokenizer.bos_token"):
    HuggingFaceTokenizer(path, bos_token="<|begin_of_text|>")


def test_tokenizer_files_that_do_not_load_are_clear_errors(tmp_path):
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00\x01 this is not a model")
  with pytest.raises(UserError, match="not a SentencePiece model that loads"):
    SentencePieceTokenizer(garbage)
  with pytest.raises(UserError, match="cannot read the SentencePiece model"):
    SentencePieceTokenizer(tmp_path / "missing.model")
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json")
  pytest.importorskip("tokenizers")
  with pytest.raises(UserError, match="not a Hugging Face tokenizer.json that loads"):
    HuggingFaceTokenizer(bad_json)
  with pytest.raises(UserError, match="has no 'encode'"):
    resolve_tokenizer(object())


def test_tokenizer_is_chosen_in_gin(sp_model, corpus_file):
  assert isinstance(build_datasets(DataConfig(source=["one", "two", "three"], seq_len=4,
                                              batch_size=1)).tokenizer, ByteTokenizer)
  gin.parse_config([
      "DataConfig.tokenizer = @sentencepiece_tokenizer()",
      f"sentencepiece_tokenizer.model_path = '{sp_model}'",
      "DataConfig.source = @text_files()",
      f"text_files.paths = '{corpus_file}'",
      "DataConfig.seq_len = 32", "DataConfig.batch_size = 2",
  ])
  datasets = build_datasets(DataConfig())
  assert isinstance(datasets.tokenizer, SentencePieceTokenizer)
  batch = datasets.train.batch_at(0)
  assert batch["inputs"].max() < 400 and batch["inputs"].shape == (2, 32)
