"""A seqio Task over local text files is a source that yields the native text source's tokens.

Needs the optional extra: pip install -e ".[seqio]" (skipped without it).
"""

import functools

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from jaxlm.data.pipeline import DataConfig, build_datasets  # pylint: disable=g-import-not-at-top
from jaxlm.data.seqio_source import seqio_source  # pylint: disable=g-import-not-at-top
from jaxlm.data.sources import text_files  # pylint: disable=g-import-not-at-top
from jaxlm.errors import UserError  # pylint: disable=g-import-not-at-top

LINES = [f"line {i}: " + "héllo wörld " * (i % 5) for i in range(80)] + ["", "last ✓"]


def _as_targets(dataset):
  return dataset.map(lambda line: {"targets": line})


@pytest.fixture
def registered_task(tmp_path):
  train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
  train.write_text("\n".join(LINES) + "\n")
  valid.write_text("held out one\nheld out two\n")
  names = []
  for name, vocabulary in (("jaxlm_test_lines", seqio.ByteVocabulary()),
                           ("jaxlm_test_lines_ids", seqio.ByteVocabulary())):
    seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource({"train": str(train), "validation": str(valid)}),
        preprocessors=[_as_targets, seqio.preprocessors.tokenize] +
        ([functools.partial(_drop_pretokenized)] if name.endswith("_ids") else []),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)})
    names.append(name)
  seqio.MixtureRegistry.add("jaxlm_test_mixture", [(names[0], 3.0), (names[1], 1.0)])
  yield train, valid
  for name in names:
    seqio.TaskRegistry.remove(name)
  seqio.MixtureRegistry.remove("jaxlm_test_mixture")


def _drop_pretokenized(dataset):
  return dataset.map(lambda ex: {"targets": ex["targets"]})


def test_seqio_task_yields_the_same_tokens_as_the_native_text_source(registered_task):
  train, valid = registered_task
  common = dict(seq_len=16, batch_size=4, max_eval_batches=None)
  native = build_datasets(DataConfig(source=text_files(str(train), separator="\n", name="lines",
                                                       valid_paths=str(valid)), **common))
  for task in ("jaxlm_test_lines", "jaxlm_test_lines_ids"):  # Text kept, or decoded from ids.
    via_seqio = build_datasets(DataConfig(
        source=seqio_source(task, valid_split="validation", name="lines"), **common))
    assert via_seqio.train.num_rows == native.train.num_rows
    for step in (0, 1, 9, 77):
      for key, value in native.train.batch_at(step).items():
        np.testing.assert_array_equal(value, via_seqio.train.batch_at(step)[key])
    for a, b in zip(native.eval["lines"], via_seqio.eval["lines"], strict=True):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_seqio_mixture_becomes_one_source_per_task_weighted_by_rate(registered_task):
  datasets = build_datasets(DataConfig(source=seqio_source("jaxlm_test_mixture"), seq_len=16,
                                       batch_size=4))
  assert datasets.train.weights == {"jaxlm_test_lines": 0.75, "jaxlm_test_lines_ids": 0.25}
  assert set(datasets.eval) == {"jaxlm_test_lines", "jaxlm_test_lines_ids"}


def test_unknown_task_split_and_feature_are_clear_errors(registered_task):
  with pytest.raises(UserError, match="no seqio Task or Mixture named 'nope'"):
    seqio_source("nope")
  with pytest.raises(UserError, match="has no split 'test'"):
    build_datasets(DataConfig(source=seqio_source("jaxlm_test_lines", split="test")))
  with pytest.raises(UserError, match="has no feature 'inputs'"):
    build_datasets(DataConfig(source=seqio_source("jaxlm_test_lines", feature="inputs")))
  with pytest.raises(UserError, match="cannot import seqio_source.module"):
    seqio_source("jaxlm_test_lines", module="no_such_module_here")
