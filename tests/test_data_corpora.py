"""The pipeline on the real corpora in ../shared/corpora (skipped when they are absent)."""

import os
import pathlib

import numpy as np
import pytest

from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.prepare import prepare_data
from jaxlm.data.sources import text_files, tokenized_store
from jaxlm.data.tokenizer_training import train_sentencepiece
from jaxlm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

CORPORA = pathlib.Path(os.environ.get("JAXLM_SHARED_CORPORA") or
                       pathlib.Path(__file__).resolve().parents[2] / "shared" / "corpora")
pytestmark = pytest.mark.skipif(not (CORPORA / "shakespeare" / "train.txt").exists(),
                                reason="../shared/corpora is not present")


def test_shakespeare_file_trains_with_a_held_out_tail():
  path = str(CORPORA / "shakespeare" / "train.txt")
  datasets = build_datasets(DataConfig(source=lambda: text_files(path), seq_len=128,
                                       batch_size=8))
  text = pathlib.Path(path).read_text()
  assert datasets.train.num_rows * 128 >= 0.98 * len(text) - 128
  assert len(datasets.eval["text"]) == 16
  for row in datasets.train.batch_at(7)["inputs"]:  # One document: rows are slices of the file.
    assert ByteTokenizer().decode(row) in text


def test_continual_mixture_of_two_prepared_domains_with_sentencepiece(tmp_path):
  """French (new domain, 95%) with replay of Shakespeare (5%), each with its own valid file,
  through SentencePiece stores: the shape of a continual-pretraining stage."""
  model = train_sentencepiece(str(CORPORA / "shakespeare" / "valid.txt"), tmp_path / "sp.model",
                              512)
  tokenizer = SentencePieceTokenizer(model)
  stores = {}
  for name in ("french", "shakespeare"):
    for split in ("train", "valid"):
      stores[name, split] = str(tmp_path / f"{name}_{split}")
      # Valid files stand in for train too: the French train file would take seconds.
      prepare_data(str(CORPORA / name / "valid.txt"), stores[name, split], tokenizer,
                   separator="\n", name=name)
  config = DataConfig(
      sources=[tokenized_store(stores[n, "train"], valid_path=stores[n, "valid"])
               for n in ("french", "shakespeare")],
      mixture={"french": 0.95, "shakespeare": 0.05}, tokenizer=tokenizer, seq_len=128,
      batch_size=8, max_eval_batches=4)
  datasets = build_datasets(config)
  assert set(datasets.eval) == {"french", "shakespeare"}
  assert datasets.train.realised_proportions(500) == pytest.approx(
      {"french": 0.95, "shakespeare": 0.05}, abs=1e-3)
  byte_lengths = tokenizer.byte_lengths()
  for name, batches in datasets.eval.items():
    bytes_per_token = sum(float((byte_lengths[b["targets"]] * b["weights"]).sum())
                          for b in batches) / sum(float(b["weights"].sum()) for b in batches)
    assert 1.0 < bytes_per_token < 8.0, (name, bytes_per_token)
  assert np.isin(datasets.train.batch_at(3)["inputs"], np.arange(512)).all()
