"""Held-out evaluation (jaxlm/evaluation/held_out.py): a fixed subset at every evaluation, every batch at a
stage's end (eval_final/...), and each loss's standard error over batches."""

import math

import numpy as np
import pytest

from jaxlm.evaluation import held_out
from jaxlm.data.pipeline import DataConfig
from jaxlm.errors import UserError

# Per-batch (summed nats, targets) of two domains; the "step" reads them off the batch.
BATCHES = {"a": [(30.0, 10.0), (26.0, 10.0), (20.0, 8.0), (33.0, 12.0)],
           "b": [(5.0, 4.0), (7.0, 4.0), (6.0, 4.0)]}


def _sets(subset):
  byte_lengths = np.array([0, 1, 2])  # Token 1 is one byte, token 2 two.
  host = {d: [{"id": np.array(i), "targets": np.array([1, 2]), "weights": np.array([1, 1])}
              for i in range(len(b))] for d, b in BATCHES.items()}
  return held_out.place_eval_sets(host, byte_lengths, lambda batch: batch, subset)


def _expected(sums):
  nats, targets = np.array(sums).T
  loss = nats.sum() / targets.sum()
  b = len(sums)
  return loss, math.sqrt(b / (b - 1) * np.sum((nats - loss * targets) ** 2)) / targets.sum()


def test_every_evaluation_reads_the_subset_and_the_final_one_every_batch():
  sets = _sets(subset=2)
  seen = []

  def step(params, batch):
    seen.append(batch)
    domain = "a" if any(batch is b for b in sets["a"].batches) else "b"
    return BATCHES[domain][int(batch["id"])]

  results = held_out.evaluate(step, None, sets)
  assert len(seen) == 4 and not any(k.startswith("eval_final/") for k in results)
  loss, stderr = _expected(BATCHES["a"][:2])
  assert results["eval/a/loss"] == pytest.approx(loss)
  assert results["eval/a/loss_stderr"] == pytest.approx(stderr)
  seen.clear()
  final = held_out.evaluate(step, None, sets, final=True)
  assert len(seen) == 7
  assert final["eval/a/loss"] == pytest.approx(loss)  # The curve's point is unchanged ...
  loss, stderr = _expected(BATCHES["a"])  # ... and the whole set is reported beside it.
  assert final["eval_final/a/loss"] == pytest.approx(loss)
  assert final["eval_final/a/loss_stderr"] == pytest.approx(stderr)
  pooled_loss, pooled_stderr = _expected(BATCHES["a"] + BATCHES["b"])
  assert final["eval_final/loss"] == pytest.approx(pooled_loss)
  assert final["eval_final/loss_stderr"] == pytest.approx(pooled_stderr)
  # 3 bytes per batch (a one-byte and a two-byte token); bits = nats / ln 2.
  nats_b = sum(n for n, _ in BATCHES["b"])
  assert final["eval_final/b/bits_per_byte"] == pytest.approx(nats_b / math.log(2) / 9)
  assert final["eval_final/b/bits_per_byte_stderr"] == pytest.approx(
      final["eval_final/b/loss_stderr"] * 12 / 9 / math.log(2))


@pytest.mark.parametrize("kwargs, expected", [
    ({"final_eval_batches": "all"}, "give 'same', None (the whole validation split)"),
    ({"max_eval_batches": 8, "final_eval_batches": 4}, "must be at least max_eval_batches=8"),
    ({"max_eval_batches": None, "final_eval_batches": 4}, "must be at least max_eval_batches"),
])
def test_bad_final_eval_batches_are_one_line(kwargs, expected):
  with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    DataConfig(**kwargs)


def test_the_eval_sets_hold_the_final_evaluations_batches():
  assert DataConfig(max_eval_batches=4).eval_batches_to_build() == 4
  assert DataConfig(max_eval_batches=4, final_eval_batches=128).eval_batches_to_build() == 128
  assert DataConfig(max_eval_batches=4, final_eval_batches=None).eval_batches_to_build() is None
