"""Packing: rows match a loop-by-loop reference, never drop or repeat a token, and mark every
document boundary with segment ids."""

import numpy as np
import pytest

from jaxlm.data.batches import make_examples
from jaxlm.data.documents import from_token_lists
from jaxlm.data.packing import PackedRows
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id


def random_documents(rng, num_documents, max_len):
  return [rng.integers(3, 259, size=rng.integers(0, max_len + 1)).astype(np.int32)
          for _ in range(num_documents)]


def pack(documents_tokens, seq_len, order=None):
  return PackedRows(from_token_lists(documents_tokens), seq_len, BOS, EOS, order=order)


def framed_stream(documents_tokens):
  """The reference stream, one token at a time: (tokens, document index)."""
  tokens, documents = [], []
  for d, t in enumerate(x for x in documents_tokens if len(x)):
    framed = [BOS, *t.tolist(), EOS]
    tokens += framed
    documents += [d + 1] * len(framed)
  return tokens, documents


def reference_pack(documents_tokens, seq_len):
  """Loop-by-loop packing, the specification PackedRows must match."""
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


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_packing_matches_reference_in_stored_and_shuffled_order(seq_len):
  documents_tokens = random_documents(np.random.default_rng(seq_len), 20, 30)
  for actual, want in zip(pack(documents_tokens, seq_len).all_rows(),
                          reference_pack(documents_tokens, seq_len)):
    assert actual.dtype == np.int32
    np.testing.assert_array_equal(actual, want)
  non_empty = [t for t in documents_tokens if len(t)]
  order = np.random.default_rng(0).permutation(len(non_empty))
  shuffled = pack(documents_tokens, seq_len, order=order).all_rows()
  for actual, want in zip(shuffled, reference_pack([non_empty[i] for i in order], seq_len)):
    np.testing.assert_array_equal(actual, want)


def test_rows_in_any_order_equal_all_rows():
  packed = pack(random_documents(np.random.default_rng(3), 30, 50), 16)
  everything = packed.all_rows()
  picks = np.random.default_rng(0).integers(0, packed.num_rows, 40)
  for part, whole in zip(packed.rows(picks), everything):
    np.testing.assert_array_equal(part, whole[picks])
  with pytest.raises(IndexError):
    packed.rows([packed.num_rows])


@pytest.mark.parametrize("seq_len", [1, 5, 16, 1000])
def test_packing_never_drops_or_duplicates_a_token(seq_len):
  documents_tokens = random_documents(np.random.default_rng(0), 30, 40)
  stream, _ = framed_stream(documents_tokens)
  tokens = pack(documents_tokens, seq_len).all_rows()[0]
  # Rows minus their one-token overlaps reproduce the stream, then only padding.
  joined = np.concatenate([tokens[0], tokens[1:, 1:].reshape(-1)])
  np.testing.assert_array_equal(joined[:len(stream)], stream)
  assert not joined[len(stream):].any() and len(joined) - len(stream) < seq_len
  # Every stream token after the first is a target exactly once.
  np.testing.assert_array_equal(tokens[:, 1:].reshape(-1)[:len(stream) - 1], stream[1:])
  np.testing.assert_array_equal(tokens[1:, 0], tokens[:-1, -1])


def test_segments_and_positions_for_a_document_starting_mid_row():
  tokens, segment_ids, positions = pack([np.array([10, 11, 12]), np.array([20, 21])],
                                        6).all_rows()
  np.testing.assert_array_equal(tokens, [[1, 10, 11, 12, 2, 1, 20], [20, 21, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 0, 0, 0]])


def test_weights_are_zero_across_documents_and_on_padding():
  batch = make_examples(*pack([np.array([10, 11, 12]), np.array([20, 21])], 6).all_rows())
  np.testing.assert_array_equal(batch["inputs"], [[1, 10, 11, 12, 2, 1], [20, 21, 2, 0, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[10, 11, 12, 2, 1, 20], [21, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]])
  assert batch["weights"].dtype == np.float32
  assert all(batch[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))
  assert all(v.shape == (2, 6) for v in batch.values())


def test_no_row_mixes_documents_without_segment_ids_marking_it():
  # Document d is made of the token d + 10 only, so a token names its document.
  rng = np.random.default_rng(7)
  documents_tokens = [np.full(rng.integers(1, 30), d + 10, np.int32) for d in range(200)]
  order = rng.permutation(200)
  tokens, segment_ids, positions = pack(documents_tokens, 24, order=order).all_rows()
  body = (tokens != BOS) & (tokens != EOS) & (segment_ids > 0)
  for row in range(tokens.shape[0]):
    for segment in np.unique(segment_ids[row][segment_ids[row] > 0]):
      in_segment = segment_ids[row] == segment
      assert len(np.unique(tokens[row][in_segment & body[row]])) <= 1  # One document each.
      start = np.flatnonzero(in_segment)[0]
      np.testing.assert_array_equal(positions[row][in_segment],
                                    np.arange(in_segment.sum()))  # Restarts per segment...
      assert start == 0 or tokens[row][start] == BOS  # ...at a bos unless carried over.
  # And no weighted target comes from another document than its input.
  batch = make_examples(tokens, segment_ids, positions)
  inputs, targets = batch["inputs"], batch["targets"]
  same_document = (inputs == targets) | (inputs == BOS) | (targets == EOS)
  assert same_document[batch["weights"] > 0].all()
  assert batch["weights"].sum() == sum(len(t) + 1 for t in documents_tokens)


def test_weights_count_every_in_document_target_once():
  documents_tokens = random_documents(np.random.default_rng(1), 25, 20)
  weights = make_examples(*pack(documents_tokens, 8).all_rows())["weights"]
  # Each framed document of n tokens has n + 1 in-document targets (tokens, then eos).
  assert weights.sum() == sum(len(t) + 1 for t in documents_tokens if len(t))


def test_empty_corpus_raises_user_error():
  for documents_tokens in ([], [np.zeros((0,), np.int32)]):
    with pytest.raises(UserError, match="has no text"):
      pack(documents_tokens, 8)
  with pytest.raises(UserError, match="seq_len"):
    pack([np.array([5])], 0)
