"""A registered seqio Task or Mixture as a source, for people coming from T5X.

    pip install -e ".[seqio]"

    DataConfig.source = @seqio_source()
    seqio_source.task = "my_task"            # or a Mixture: one source per task, weighted by rate
    seqio_source.module = "my_project.tasks"  # imported first, so that it registers the task

The task's examples are run through its preprocessors (shuffle off, one epoch) and the text of
`feature` becomes one document per example: its `<feature>_pretokenized` copy when present (seqio's
tokenize preprocessor keeps one), else the feature itself if it is text, else the ids decoded
with the task's vocabulary. The text is then tokenized with DataConfig.tokenizer like any other
source, so bits per byte and the tokenized stores mean the same thing for every source.

seqio and TensorFlow are imported only when a seqio source is loaded; TensorFlow is kept off any
accelerator so that it leaves the devices to JAX.
"""

import dataclasses
import importlib
import logging
import os

import gin
import numpy as np

from jaxlm.data import readers
from jaxlm.data.documents import tokenize_documents
from jaxlm.data.sources import LoadedSource
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")


def _import_seqio():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("seqio sources need seqio: pip install -e '.[seqio]'") from None
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised by someone else; leave it be.
    pass
  return seqio


def _provider(seqio, name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise UserError(f"no seqio Task or Mixture named {name!r} is registered ({e}); set "
                    "seqio_source.module to the module that registers it") from None


@dataclasses.dataclass(frozen=True)
class SeqioSource:
  name: str
  task: str
  split: str = "train"
  valid_split: str | None = None
  feature: str = "targets"
  on_bad_utf8: str = "replace"
  default_weight: float | None = None  # A Mixture's rate for this task.

  def load(self, tokenizer) -> LoadedSource:
    train = tokenize_documents(self.texts(self.split), tokenizer)
    valid = (tokenize_documents(self.texts(self.valid_split), tokenizer)
             if self.valid_split is not None else None)
    return LoadedSource(self.name, train, valid)

  def texts(self, split: str) -> list[str]:
    seqio = _import_seqio()
    task = _provider(seqio, self.task)
    if split not in task.splits:
      raise UserError(f"seqio task {self.task!r} has no split {split!r}; it has "
                      f"{list(task.splits)}")
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                               use_cached=False)
    vocabulary = task.output_features[self.feature].vocabulary \
        if self.feature in task.output_features else None
    stats, texts = readers.ReadStats(files=1), []
    for example in dataset.as_numpy_iterator():
      text = self._text_of(example, vocabulary, stats)
      if text:
        stats.documents += 1
        texts.append(text)
    stats.log(f"seqio source {self.name!r} ({self.task}, {split})")
    return texts

  def _text_of(self, example, vocabulary, stats) -> str | None:
    value = example.get(f"{self.feature}_pretokenized", example.get(self.feature))
    if value is None:
      raise UserError(f"seqio task {self.task!r} has no feature {self.feature!r}; its examples "
                      f"have {sorted(example)}; set seqio_source.feature")
    if isinstance(value, (bytes, np.bytes_)):
      return readers.decode_document(bytes(value), self.on_bad_utf8, stats)
    if isinstance(value, str):
      return value
    if vocabulary is None:
      raise UserError(f"feature {self.feature!r} of seqio task {self.task!r} holds ids but the "
                      "task has no vocabulary for it to decode them with")
    return vocabulary.decode(np.asarray(value).tolist())


@gin.configurable
def seqio_source(task: str = gin.REQUIRED, split: str = "train", valid_split: str | None = None,
                 feature: str = "targets", name: str | None = None, module: str | None = None,
                 on_bad_utf8: str = "replace") -> SeqioSource | list[SeqioSource]:
  """A seqio Task as one source (named after the task unless `name` is given), or a Mixture as
  one source per task with the mixture's rates as default weights (DataConfig.mixture, when set,
  overrides them). `valid_split` (e.g. "validation") gives the source its own validation set."""
  if on_bad_utf8 not in readers.BAD_UTF8_POLICIES:
    raise UserError(f"seqio_source.on_bad_utf8 must be one of {readers.BAD_UTF8_POLICIES}")
  seqio = _import_seqio()
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise UserError(f"cannot import seqio_source.module {module!r} ({e})") from None
  provider = _provider(seqio, task)
  options = dict(split=split, valid_split=valid_split, feature=feature, on_bad_utf8=on_bad_utf8)
  if isinstance(provider, seqio.Mixture):
    return [SeqioSource(name=t.name, task=t.name, default_weight=provider.get_rate(t), **options)
            for t in provider.tasks]
  return SeqioSource(name=name or task, task=task, **options)
