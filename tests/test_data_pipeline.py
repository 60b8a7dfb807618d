"""Train batches by step: epochs, exact resume, per-host shards, mixtures, per-domain eval."""

import subprocess
import sys

import gin
import numpy as np
import pytest

from jaxlm.data.batches import TrainBatches, eval_batches
from jaxlm.data.documents import from_token_lists
from jaxlm.data.packing import PackedRows
from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.sampling import WeightedInterleave, integer_proportions
from jaxlm.data.sources import documents_source
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError
from jaxlm.training.stages import Stage

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id


def letter_source(letter, num_documents=60, name=None):
  """Documents made only of `letter`, so every token names its source."""
  rng = np.random.default_rng(ord(letter))
  return documents_source([letter * int(n) for n in rng.integers(5, 60, num_documents)],
                          name=name or letter)


def small_rows(num_rows, seq_len=4):
  rows = PackedRows(from_token_lists([np.full(seq_len * num_rows - 1, 7, np.int32)]), seq_len,
                    BOS, EOS)
  assert rows.num_rows == num_rows
  return rows


def batches_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_at_is_deterministic_and_covers_each_row_once_per_epoch():
  batches = TrainBatches({"x": small_rows(10)}, {"x": 1.0}, batch_size=3, seed=0)
  drawn = [row for step in range(10) for _, row in batches.row_refs_at(step)]  # 3 epochs.
  epochs = np.array(drawn).reshape(3, 10)
  for order in epochs:
    assert sorted(order) == list(range(10))
  assert len({tuple(order) for order in epochs}) == 3  # A fresh shuffle every epoch.
  again = TrainBatches({"x": small_rows(10)}, {"x": 1.0}, batch_size=3, seed=0)
  for step in (7, 0, 123456):
    assert batches_equal(batches.batch_at(step), again.batch_at(step))
  other_seed = TrainBatches({"x": small_rows(10)}, {"x": 1.0}, batch_size=3, seed=1)
  assert drawn != [row for step in range(10) for _, row in other_seed.row_refs_at(step)]
  assert batches.tokens_per_batch == 3 * 4 and batches.num_rows == 10


def test_batch_at_works_with_fewer_rows_than_batch_size():
  batches = TrainBatches({"x": small_rows(3)}, {"x": 1.0}, batch_size=8, seed=0)
  drawn = [row for step in range(3) for _, row in batches.row_refs_at(step)]
  for order in np.array(drawn).reshape(8, 3):
    assert sorted(order) == [0, 1, 2]
  assert batches.batch_at(2)["inputs"].shape == (8, 4)


def test_an_epoch_of_batches_holds_every_token_exactly_once():
  documents = [f"doc {i} " + "xyz" * (i % 11) for i in range(150)]
  datasets = build_datasets(DataConfig(source=documents, seq_len=16, batch_size=4,
                                       valid_source=["held out"]))
  train = datasets.train
  # Global rows [0, num_rows) are the first epoch; batches may straddle into the second.
  steps = -(-train.num_rows // train.batch_size)
  refs = [ref for step in range(steps) for ref in train.row_refs_at(step)][:train.num_rows]
  assert sorted(r for _, r in refs) == list(range(train.num_rows))
  batches = [train.batch_at(step) for step in range(steps)]
  targets, weights = (np.concatenate([b[k] for b in batches])[:train.num_rows]
                      for k in ("targets", "weights"))
  expected = np.concatenate([np.append(ByteTokenizer().encode(d), EOS) for d in documents])
  np.testing.assert_array_equal(np.bincount(targets[weights > 0], minlength=259),
                                np.bincount(expected, minlength=259))


# Run both in this process and in a fresh one, so both build exactly the same config.
RESUME_SETUP = """
import hashlib
from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.sources import documents_source
documents = [f"doc {i} " + "abc" * (i % 13) for i in range(120)]
config = DataConfig(sources=[documents_source(documents, "a"),
                             documents_source([d.upper() for d in documents], "b")],
                    mixture={"a": 0.7, "b": 0.3}, seq_len=16, batch_size=4)

def digests(train, start, count=50):
  return [hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
          for batch in map(train.batch_at, range(start, start + count))]
"""


def test_resume_mid_epoch_gives_the_identical_next_50_batches():
  setup = {}
  exec(RESUME_SETUP, setup)  # pylint: disable=exec-used
  train = build_datasets(setup["config"]).train
  start = train.num_rows // train.batch_size // 2 + 3  # Mid-epoch for both sources.
  for step in range(start):  # The run before the interruption.
    train.batch_at(step)
  expected = setup["digests"](train, start)
  # The resumed run: a fresh process (other hash seeds, no shared state) that knows the step.
  script = RESUME_SETUP + f"print(digests(build_datasets(config).train, {start}))"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip().splitlines()[-1] == str(expected)


@pytest.mark.parametrize("shard_count", [2, 4])
def test_per_host_shards_are_disjoint_and_cover_the_global_batch(shard_count):
  config = DataConfig(sources=[letter_source("a"), letter_source("b")],
                      mixture={"a": 0.5, "b": 0.5}, seq_len=8, batch_size=8)
  whole = build_datasets(config)
  shards = [build_datasets(config, shard_index=i, shard_count=shard_count)
            for i in range(shard_count)]
  for step in (0, 3, 41):
    parts = [s.train.batch_at(step) for s in shards]
    assert all(p["inputs"].shape == (8 // shard_count, 8) for p in parts)
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert batches_equal(joined, whole.train.batch_at(step))
    rows = [set(s.train.global_rows_at(step).tolist()) for s in shards]
    assert set().union(*rows) == set(range(step * 8, step * 8 + 8))
    assert sum(map(len, rows)) == 8  # Disjoint.
  assert shards[1].eval.keys() == whole.eval.keys()  # Eval is not sharded.
  with pytest.raises(UserError, match="must divide by the 3 hosts"):
    build_datasets(config, shard_index=0, shard_count=3)


@pytest.mark.parametrize("weights", [{"a": 0.95, "b": 0.05}, {"a": 0.5, "b": 0.3, "c": 0.2},
                                     {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}])
def test_mixture_proportions_match_the_weights(weights):
  config = DataConfig(sources=[letter_source(n) for n in "abc"], mixture=weights, seq_len=8,
                      batch_size=8)
  train = build_datasets(config).train
  steps = 250
  counts = {name: 0 for name in "abc"}
  for step in range(steps):
    first_letters = train.batch_at(step)["inputs"][:, 1:].max(axis=1)  # Row content: the source.
    for token in first_letters:
      counts[ByteTokenizer().decode([token])] += 1
  rows = steps * 8
  realised = train.realised_proportions(steps)
  for name in "abc":
    target = weights.get(name, 0.0)
    assert realised[name] == counts[name] / rows
    # The interleave keeps every source within (number of sources) rows of weight * rows at
    # every prefix; a coin flip per row would need ~3 standard deviations (0.013 here).
    assert abs(counts[name] - target * rows) <= len(weights), (name, counts, weights)


def test_weighted_interleave_is_grains_mixing_rule_with_exact_proportions():
  grain = pytest.importorskip("grain")
  ours = WeightedInterleave([0.75, 0.25])
  theirs = grain.MapDataset.mix([grain.MapDataset.range(1000).map(lambda x: (0, x)),
                                 grain.MapDataset.range(1000).map(lambda x: (1, x))],
                                weights=[0.75, 0.25])
  assert [ours[k] for k in range(200)] == [theirs[k] for k in range(200)]
  assert integer_proportions([0.95, 0.05]) == (19, 1)
  assert integer_proportions([1, 1, 1]) == (1, 1, 1)
  selection = WeightedInterleave([0.333, 0.667])
  components, indices = selection.select(np.arange(3000))
  assert np.bincount(components).tolist() == [999, 2001]
  for c in (0, 1):  # Each component's indices are 0, 1, 2, ... in order: nothing skipped.
    np.testing.assert_array_equal(indices[components == c], np.arange((components == c).sum()))
  assert selection.counts(3000).tolist() == [999, 2001]


def test_bad_mixture_weights_are_clear_errors():
  sources = [letter_source("a"), letter_source("b")]
  for mixture, message in (({"a": -0.1, "b": 1.0}, "must be finite and >= 0"),
                           ({"a": 0.0, "b": 0.0}, "sum to 0"),
                           ({"a": 1.0, "bb": 1.0}, "did you mean 'b'"),
                           ([0.5, 0.5], "must map source names to weights")):
    with pytest.raises(UserError, match=message):
      build_datasets(DataConfig(sources=sources, mixture=mixture, seq_len=8, batch_size=2))
  with pytest.raises(UserError, match="several sources are named"):
    build_datasets(DataConfig(sources=[letter_source("a"), letter_source("b", name="a")]))


def test_every_domain_is_evaluated_even_at_weight_zero_with_padded_batches():
  config = DataConfig(sources=[letter_source("a"), letter_source("b", 90)],
                      mixture={"a": 1.0}, seq_len=16, batch_size=4, eval_batch_size=3,
                      max_eval_batches=None)
  datasets = build_datasets(config)
  assert set(datasets.eval) == {"a", "b"}
  assert datasets.train.realised_proportions(100) == {"a": 1.0, "b": 0.0}
  for name, batches in datasets.eval.items():
    assert batches and all(b["inputs"].shape == (3, 16) for b in batches)
    text = ByteTokenizer().decode(np.concatenate([b["inputs"] for b in batches]))
    assert set(text) == {name}
    last = batches[-1]
    padded = last["weights"].sum(axis=1) == 0
    assert not last["inputs"][padded].any()


def test_eval_batches_cover_every_row_once_and_pad():
  rows = small_rows(10)
  batches = eval_batches(rows, batch_size=4)
  assert len(batches) == 3 and all(b["inputs"].shape == (4, 4) for b in batches)
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs[:10], rows.all_rows()[0][:, :-1])
  assert not inputs[10:].any() and not batches[-1]["weights"][2:].any()
  assert batches[-1]["weights"][:2].all()
  assert len(eval_batches(rows, batch_size=4, max_batches=2)) == 2


TWO_STAGES = """
DataConfig.sources = [@a/documents_source(), @b/documents_source()]
a/documents_source.name = "a"
b/documents_source.name = "b"
DataConfig.seq_len = 8
DataConfig.batch_size = 8
pretrain/DataConfig.mixture = {"a": 1.0}
continual/DataConfig.mixture = {"a": 0.05, "b": 0.95}
stage_list.stages = [@pretrain/Stage(), @continual/Stage()]
"""


@gin.configurable
def stage_list(stages):
  return stages


def test_two_gin_scoped_stages_get_their_own_mixtures():
  gin.external_configurable(documents_source, module="test")
  gin.parse_config(TWO_STAGES + "\n".join([
      f"a/documents_source.documents = {['a' * n for n in range(5, 40)]}",
      f"b/documents_source.documents = {['b' * n for n in range(5, 40)]}"]))
  pretrain_stage, continual_stage = stage_list()  # Each Stage builds its DataConfig in scope.
  assert isinstance(pretrain_stage, Stage) and isinstance(continual_stage, Stage)
  pretrain = build_datasets(pretrain_stage.data).train
  continual = build_datasets(continual_stage.data).train
  assert pretrain.realised_proportions(100) == {"a": 1.0, "b": 0.0}
  assert continual.realised_proportions(100) == pytest.approx({"a": 0.05, "b": 0.95}, abs=0.003)
  # The continual stage can pick up source "a" where the first stage left it.
  drawn = pretrain.rows_drawn(30)
  assert drawn == {"a": 240, "b": 0}
  resumed = build_datasets(DataConfig(sources=[documents_source(["a" * n for n in range(5, 40)],
                                                                "a")],
                                      seq_len=8, batch_size=8), start_rows=drawn).train
  assert [r for _, r in resumed.row_refs_at(0)] == [r for _, r in pretrain.row_refs_at(30)]


def test_bad_data_settings_are_user_errors():
  documents = [f"doc {i}" for i in range(50)]
  for bad in (dict(seq_len=0), dict(batch_size=0), dict(valid_fraction=1.0), dict(seed=-1),
              dict(eval_batch_size=-1)):
    with pytest.raises(UserError):
      build_datasets(DataConfig(source=documents, **bad))
  with pytest.raises(UserError, match="has no text"):
    build_datasets(DataConfig(source=["", ""]))
  with pytest.raises(UserError, match="valid_source is for a single source"):
    build_datasets(DataConfig(sources=[letter_source("a"), letter_source("b")],
                              valid_source=["x"]))


def test_data_config_is_gin_configurable(tmp_path):
  (tmp_path / "a.txt").write_text("some text to train on " * 20)
  gin.parse_config(["DataConfig.seq_len = 8", "DataConfig.source = @text_files",
                    f"text_files.paths = '{tmp_path}'"])
  datasets = build_datasets(DataConfig())
  assert datasets.train.seq_len == 8 and list(datasets.eval) == ["text"]
