"""Tests for jaxlm.data: tokenizer, corpora, sources, packing, batches."""

import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest

from jaxlm.data import corpora
from jaxlm.data.packing import pack_stream
from jaxlm.data.pipeline import (DataConfig, TrainBatches, build_datasets, eval_batches,
                                 make_examples)
from jaxlm.data.sources import builtin_corpus, split_train_valid, text_files
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id
SHARED_CORPORA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'corpora'


def random_documents(rng, num_documents, max_len):
  return [rng.integers(3, 259, size=rng.integers(0, max_len + 1)).astype(np.int32)
          for _ in range(num_documents)]


def framed_stream(documents_tokens):
  """The reference stream, one token at a time: (tokens, document index)."""
  tokens, documents = [], []
  for d, t in enumerate(x for x in documents_tokens if len(x)):
    framed = [BOS, *t.tolist(), EOS]
    tokens += framed
    documents += [d + 1] * len(framed)
  return tokens, documents


def reference_pack(documents_tokens, seq_len):
  """Loop-by-loop packing, the specification pack_stream must match."""
  tokens, documents = framed_stream(documents_tokens)
  num_rows = -(-(len(tokens) - 1) // seq_len)
  pad = num_rows * seq_len + 1 - len(tokens)
  tokens, documents = tokens + [0] * pad, documents + [0] * pad
  rows = []
  for r in range(num_rows):
    window = slice(r * seq_len, r * seq_len + seq_len + 1)
    row_tokens, row_documents = tokens[window], documents[window]
    segment_ids, positions, renumber = [], [], {}
    for c, d in enumerate(row_documents):
      if d == 0:
        segment_ids.append(0)
        positions.append(0)
        continue
      if d not in renumber:
        renumber[d] = (len(renumber) + 1, c)
      segment_ids.append(renumber[d][0])
      positions.append(c - renumber[d][1])
    rows.append((row_tokens, segment_ids, positions))
  return [np.array([row[i] for row in rows], np.int32) for i in range(3)]


# --- tokenizer ---

def test_byte_tokenizer_round_trips_unicode():
  tok = ByteTokenizer()
  text = 'héllo wörld ✓ 日本語 \n\t\x00'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tok.vocab_size
  assert len(ids) == len(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *tok.encode('ab'), tok.eos_id, tok.pad_id, 999]) == 'ab'
  lengths = tok.byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths[:3].sum() == 0
  assert lengths[ids].sum() == len(text.encode('utf-8'))


# --- packing ---

@pytest.mark.parametrize('seq_len', [1, 2, 7, 64])
def test_pack_stream_matches_reference(seq_len):
  documents_tokens = random_documents(np.random.default_rng(seq_len), 20, 30)
  rows = pack_stream(documents_tokens, seq_len, BOS, EOS)
  expected = reference_pack(documents_tokens, seq_len)
  for actual, want in zip((rows.tokens, rows.segment_ids, rows.positions), expected):
    assert actual.dtype == np.int32
    np.testing.assert_array_equal(actual, want)


@pytest.mark.parametrize('seq_len', [1, 5, 16, 1000])
def test_packing_never_drops_or_duplicates_a_token(seq_len):
  documents_tokens = random_documents(np.random.default_rng(0), 30, 40)
  stream, _ = framed_stream(documents_tokens)
  rows = pack_stream(documents_tokens, seq_len, BOS, EOS)
  # Rows minus their one-token overlaps reproduce the stream, then only padding.
  joined = np.concatenate([rows.tokens[0], rows.tokens[1:, 1:].reshape(-1)])
  np.testing.assert_array_equal(joined[:len(stream)], stream)
  assert not joined[len(stream):].any() and len(joined) - len(stream) < seq_len
  # Every stream token after the first is a target exactly once.
  targets = rows.tokens[:, 1:].reshape(-1)
  np.testing.assert_array_equal(targets[:len(stream) - 1], stream[1:])
  np.testing.assert_array_equal(rows.tokens[1:, 0], rows.tokens[:-1, -1])


def test_segments_and_positions_for_a_document_starting_mid_row():
  rows = pack_stream([np.array([10, 11, 12]), np.array([20, 21])], 6, BOS, EOS)
  np.testing.assert_array_equal(rows.tokens, [[1, 10, 11, 12, 2, 1, 20], [20, 21, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 0, 0, 0]])


def test_weights_are_zero_across_documents_and_on_padding():
  rows = pack_stream([np.array([10, 11, 12]), np.array([20, 21])], 6, BOS, EOS)
  batch = make_examples(rows.tokens, rows.segment_ids, rows.positions)
  np.testing.assert_array_equal(batch['inputs'], [[1, 10, 11, 12, 2, 1], [20, 21, 2, 0, 0, 0]])
  np.testing.assert_array_equal(batch['targets'], [[10, 11, 12, 2, 1, 20], [21, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['weights'], [[1, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]])
  assert batch['weights'].dtype == np.float32
  assert all(batch[k].dtype == np.int32 for k in ('inputs', 'targets', 'segment_ids', 'positions'))
  assert all(v.shape == (2, 6) for v in batch.values())


def test_weights_count_every_in_document_target_once():
  documents_tokens = random_documents(np.random.default_rng(1), 25, 20)
  rows = pack_stream(documents_tokens, 8, BOS, EOS)
  weights = make_examples(rows.tokens, rows.segment_ids, rows.positions)['weights']
  # Each framed document of n tokens has n + 1 in-document targets (tokens, then eos).
  assert weights.sum() == sum(len(t) + 1 for t in documents_tokens if len(t))


def test_empty_corpus_raises_user_error():
  for documents_tokens in ([], [np.zeros((0,), np.int32)]):
    with pytest.raises(UserError, match='has no text'):
      pack_stream(documents_tokens, 8, BOS, EOS)
  with pytest.raises(UserError):
    build_datasets(DataConfig(source=lambda: ['', '']), ByteTokenizer())
  with pytest.raises(UserError, match='no documents'):
    build_datasets(DataConfig(source=lambda: []), ByteTokenizer())


# --- batches ---

def small_rows(num_rows, seq_len=4):
  documents_tokens = [np.full(seq_len * num_rows - 1, 7, np.int32)]
  rows = pack_stream(documents_tokens, seq_len, BOS, EOS)
  assert rows.num_rows == num_rows
  return rows


def test_batch_at_is_deterministic_and_covers_each_row_once_per_epoch():
  rows = small_rows(10)
  batches = TrainBatches(rows, batch_size=3, seed=0)
  drawn = np.concatenate([batches.row_indices_at(step) for step in range(10)])  # 3 epochs.
  epochs = drawn.reshape(3, 10)
  for order in epochs:
    assert sorted(order) == list(range(10))
  assert len({tuple(order) for order in epochs}) == 3  # A fresh shuffle every epoch.
  again = TrainBatches(rows, batch_size=3, seed=0)
  for step in (7, 0, 123456):
    for key, value in batches.batch_at(step).items():
      np.testing.assert_array_equal(value, again.batch_at(step)[key])
  other_seed = TrainBatches(rows, batch_size=3, seed=1)
  assert not np.array_equal(drawn, np.concatenate(
      [other_seed.row_indices_at(step) for step in range(10)]))
  batch = batches.batch_at(4)
  np.testing.assert_array_equal(batch['inputs'], rows.tokens[batches.row_indices_at(4), :-1])
  assert batches.tokens_per_batch == 3 * 4 and batches.num_rows == 10


def test_batch_at_works_with_fewer_rows_than_batch_size():
  batches = TrainBatches(small_rows(3), batch_size=8, seed=0)
  drawn = np.concatenate([batches.row_indices_at(step) for step in range(3)])
  for order in drawn.reshape(8, 3):
    assert sorted(order) == [0, 1, 2]
  assert batches.batch_at(2)['inputs'].shape == (8, 4)


def test_eval_batches_cover_every_row_once_and_pad():
  rows = small_rows(10)
  batches = eval_batches(rows, batch_size=4)
  assert len(batches) == 3 and all(b['inputs'].shape == (4, 4) for b in batches)
  inputs = np.concatenate([b['inputs'] for b in batches])
  np.testing.assert_array_equal(inputs[:10], rows.tokens[:, :-1])
  assert not inputs[10:].any() and not batches[-1]['weights'][2:].any()
  assert batches[-1]['weights'][:2].all()
  assert len(eval_batches(rows, batch_size=4, max_batches=2)) == 2


def test_build_datasets_end_to_end_and_bad_settings():
  documents = [f'document number {i} ' * (i % 7 + 1) for i in range(200)]
  config = DataConfig(source=lambda: documents, seq_len=16, batch_size=4, max_eval_batches=None)
  train, valid = build_datasets(config, ByteTokenizer())
  assert train.batch_at(0)['inputs'].shape == (4, 16)
  assert valid and all(b['targets'].shape == (4, 16) for b in valid)
  config = DataConfig(source=lambda: documents, valid_source=lambda: ['held out'], seq_len=16,
                      eval_batch_size=2)
  _, valid = build_datasets(config, ByteTokenizer())
  assert len(valid) == 1 and valid[0]['inputs'].shape == (2, 16)
  assert ByteTokenizer().decode(valid[0]['inputs'][0]) == 'held out'
  for bad in (dict(seq_len=0), dict(batch_size=0), dict(valid_fraction=1.0)):
    with pytest.raises(UserError):
      build_datasets(DataConfig(source=lambda: documents, **bad), ByteTokenizer())


def test_data_config_is_gin_configurable(tmp_path):
  (tmp_path / 'a.txt').write_text('some text to train on ' * 20)
  try:
    gin.parse_config(['DataConfig.seq_len = 8', 'DataConfig.source = @text_files',
                      f"text_files.paths = '{tmp_path}'"])
    config = DataConfig()
    assert config.seq_len == 8
    train, _ = build_datasets(config, ByteTokenizer())
    assert train.seq_len == 8
  finally:
    gin.clear_config()


def test_pipeline_import_does_not_import_jax():
  code = 'import sys, jaxlm.data.pipeline; assert "jax" not in sys.modules, "jax imported"'
  subprocess.run([sys.executable, '-c', code], check=True)


# --- built-in corpus ---

def test_builtin_corpus_builds_and_then_reads_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXLM_CACHE_DIR', str(tmp_path))
  code = corpora.builtin_documents('code')
  prose = corpora.builtin_documents('prose')
  assert len(code) > 100 and any('def ' in d for d in code)
  assert len(prose) > 10 and all(prose)
  assert builtin_corpus() == code + prose and builtin_corpus(('prose',)) == prose
  names = sorted(p.name for p in tmp_path.iterdir())
  assert len(names) == 2 and all(sys.version.split()[0] in n for n in names)  # No .tmp left.

  def must_not_build():
    raise AssertionError('rebuilt instead of reading the cache')
  monkeypatch.setitem(corpora._BUILDERS, 'code', must_not_build)
  assert corpora.builtin_documents('code') == code
  with pytest.raises(UserError, match='unknown built-in corpus domain'):
    corpora.builtin_documents('poetry')


def test_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch):
  def crash(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(corpora.os, 'replace', crash)
  with pytest.raises(KeyboardInterrupt):
    corpora.builtin_documents('prose', cache_dir=tmp_path)
  assert not list(tmp_path.iterdir())


# --- sources ---

def test_text_files_reads_dirs_globs_and_single_paths(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'b.txt').write_text('bee\n\n\nbuzz\n\n\n')
  (tmp_path / 'sub' / 'a.txt').write_text('ant ✓')
  assert text_files(str(tmp_path)) == ['bee\n\n\nbuzz\n\n\n', 'ant ✓']
  assert text_files(str(tmp_path / '**' / '*.txt')) == ['bee\n\n\nbuzz\n\n\n', 'ant ✓']
  assert text_files([str(tmp_path / 'b.txt'), str(tmp_path)], separator='\n\n\n') == [
      'bee', 'buzz', 'ant ✓']  # b.txt named twice, read once.
  with pytest.raises(UserError, match='does not exist'):
    text_files(str(tmp_path / 'missing.txt'))
  with pytest.raises(UserError, match='matches no files'):
    text_files(str(tmp_path / '*.json'))


def test_split_train_valid_is_disjoint_and_deterministic():
  documents = [f'doc {i}' for i in range(200)]
  train, valid = split_train_valid(documents, 0.1, seed=0)
  assert len(valid) == 20 and not set(train) & set(valid)
  assert sorted(train + valid) == sorted(documents)
  assert (train, valid) == split_train_valid(documents, 0.1, seed=0)
  assert split_train_valid(documents, 0.1, seed=1)[1] != valid
  assert split_train_valid(documents[::-1], 0.1, seed=0)[1] == valid[::-1]  # Order-free.
  train, valid = split_train_valid(['same', 'same', 'other', 'x', 'y'], 0.2, seed=0)
  assert not set(train) & set(valid)
  assert split_train_valid(['a', 'b', 'c'], 0.01, seed=0)[1]  # Never empty.


def test_split_train_valid_one_document_and_bad_fraction():
  assert split_train_valid(['abcdefghij'], 0.2, seed=0) == (['abcdefgh'], ['ij'])
  for fraction in (0.0, 1.0, -0.5):
    with pytest.raises(UserError, match='valid_fraction'):
      split_train_valid(['a', 'b'], fraction, seed=0)


@pytest.mark.skipif(not (SHARED_CORPORA / 'shakespeare' / 'train.txt').exists(),
                    reason='../shared/corpora is not present')
def test_shakespeare_file_trains_with_a_held_out_tail():
  path = str(SHARED_CORPORA / 'shakespeare' / 'train.txt')
  config = DataConfig(source=lambda: text_files(path), seq_len=128, batch_size=8)
  train, valid = build_datasets(config, ByteTokenizer())
  text = pathlib.Path(path).read_text()
  assert train.num_rows * 128 >= 0.98 * len(text) - 128 and len(valid) == 16
  assert 'ROMEO' in ByteTokenizer().decode(train.rows.tokens.reshape(-1))
