"""DataConfig -> Datasets: the tokenizer, train batches by step, and eval batches per domain.

    datasets = build_datasets(data_config, shard_index=jax.process_index(),
                              shard_count=jax.process_count())
    batch = datasets.train.batch_at(step)        # this host's rows of global batch `step`
    for domain, batches in datasets.eval.items(): ...
    byte_lengths = datasets.tokenizer.byte_lengths()

Importing this module imports grain (sampling.py), and grain imports jax.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np

from jaxlm.data import sources as source_lib
from jaxlm.data.batches import Batch, TrainBatches, eval_batches, make_examples
from jaxlm.data.documents import split_train_valid
from jaxlm.data.packing import PackedRows
from jaxlm.data.sampling import derived_seed, normalize_weights
from jaxlm.data.seqio_source import seqio_source  # Registers the gin name; imports no seqio.
from jaxlm.data.tokenizers import resolve_tokenizer
from jaxlm.errors import UserError
from jaxlm.validation import check_field_types, check_range

logger = logging.getLogger("jaxlm")

__all__ = ["Batch", "DataConfig", "Datasets", "TrainBatches", "build_datasets", "check_sources",
           "eval_batches", "make_examples", "seqio_source"]

PROPORTION_LOG_STEPS = 1000  # build_datasets logs the realised mixture over this many steps.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train and evaluate on, and how to cut it into batches.

  One source (`source`) or several named ones (`sources`) mixed by `mixture` weights. Every
  source is evaluated on its own validation set, also one whose weight is 0, which is how a
  continual-pretraining run measures forgetting. A stage is given its own DataConfig through a
  gin scope, so each stage can have its own mixture:

      DataConfig.sources = [@old/text_files(), @new/text_files()]
      old/text_files.name = "shakespeare"
      old/text_files.paths = "/data/shakespeare/train.txt"
      new/text_files.name = "french"
      new/text_files.paths = "/data/french/train.txt"

      run.stages = [@pretrain/Stage(), @continual/Stage()]
      pretrain/DataConfig.mixture = {"shakespeare": 1.0}
      continual/DataConfig.mixture = {"french": 0.95, "shakespeare": 0.05}   # 5% replay

  (Stage builds its DataConfig inside its scope; `continual/Stage.data = @continual/DataConfig()`
  says the same explicitly.)
  """
  source: Any = source_lib.builtin_corpus  # A source, a list of them, or a callable giving one.
  sources: Sequence[Any] = ()  # Several named sources; when given, `source` is not used.
  mixture: Mapping[str, float] | None = None  # {name: weight}; None: in proportion to size.
  tokenizer: Any = None  # None: byte-level; e.g. @sentencepiece_tokenizer().
  valid_source: Any = None  # The one source's validation documents instead of a split.
  valid_fraction: float = 0.02  # Split off sources that have no validation set of their own.
  seq_len: int = 256
  batch_size: int = 16  # The global batch: all hosts together.
  eval_batch_size: int | None = None  # None: batch_size.
  max_eval_batches: int | None = 16  # Per domain, every evaluation; None: the whole split.
  # The evaluation at each stage's end (eval_final/...): "same" as every other, None for the
  # whole validation split of each domain, or this many batches (at least max_eval_batches).
  final_eval_batches: int | str | None = "same"
  seed: int = 0

  def __post_init__(self):
    check_field_types(self)
    for name in ("seq_len", "batch_size"):
      check_range(f"DataConfig.{name}", getattr(self, name), low=1, integer=True)
    for name in ("eval_batch_size", "max_eval_batches"):
      check_range(f"DataConfig.{name}", getattr(self, name), low=1, integer=True, optional=True)
    check_range("DataConfig.seed", self.seed, low=0, integer=True)
    check_range("DataConfig.valid_fraction", self.valid_fraction, low=0, high=1, low_open=True,
                high_open=True)
    final = self.final_eval_batches
    if isinstance(final, str) and final != "same":
      raise UserError(f"DataConfig.final_eval_batches={final!r}: give 'same', None (the whole "
                      "validation split) or a number of batches")
    if not isinstance(final, str):
      check_range("DataConfig.final_eval_batches", final, low=1, integer=True, optional=True)
      if final is not None and (self.max_eval_batches is None or final < self.max_eval_batches):
        raise UserError(f"DataConfig.final_eval_batches={final} must be at least "
                        f"max_eval_batches={self.max_eval_batches}: the final evaluation "
                        "includes every other's batches")

  def eval_batches_to_build(self) -> int | None:
    """Batches per domain the eval sets hold: the final evaluation's (None: all)."""
    return self.max_eval_batches if self.final_eval_batches == "same" else self.final_eval_batches


@dataclasses.dataclass(frozen=True)
class Datasets:
  train: TrainBatches
  eval: dict[str, list[Batch]]  # Domain (source name) -> batches, each [eval_batch_size, L].
  tokenizer: Any


def _sources_of(config: DataConfig) -> list:
  if config.sources:
    found = source_lib.as_sources(list(config.sources), "DataConfig.sources")
  else:
    found = source_lib.as_sources(config.source, "DataConfig.source")
  names = [s.name for s in found]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"several sources are named {duplicates}; give each its own name (e.g. "
                    "scoped: old/text_files.name = 'old')")
  if config.valid_source is not None and len(found) != 1:
    raise UserError("DataConfig.valid_source is for a single source; with several, give each "
                    "its own (text_files.valid_paths, tokenized_store.valid_path, ...)")
  return found


def _eval_domain_sources(eval_domains: Sequence[Any]) -> list:
  return source_lib.as_sources(list(eval_domains), "EvalConfig.domains") if eval_domains else []


def check_sources(config: DataConfig, eval_domains: Sequence[Any] = ()) -> list[str]:
  """The sources (and evaluation-only domains) resolve (paths exist, names are unique) and the
  mixture names only them, without reading or tokenizing any text: what a run checks for every
  stage at start-up. Returns the training sources' names."""
  found = _sources_of(config)
  _eval_domain_sources(eval_domains)
  if config.mixture is not None:
    normalize_weights(config.mixture, [s.name for s in found])
  return [s.name for s in found]


def _weights(config: DataConfig, found: list, train_rows: dict[str, PackedRows]):
  names = [s.name for s in found]
  if config.mixture is not None:
    return normalize_weights(config.mixture, names)
  defaults = [getattr(s, "default_weight", None) for s in found]
  if all(w is not None for w in defaults):  # A seqio Mixture's rates.
    return normalize_weights(dict(zip(names, defaults)), names)
  return normalize_weights({n: float(train_rows[n].num_rows) for n in names}, names)


def _valid_documents(config: DataConfig, tokenizer):
  valid = source_lib.as_sources(config.valid_source, "DataConfig.valid_source")
  if len(valid) != 1:
    raise UserError("DataConfig.valid_source must be one source or a list of documents")
  return valid[0].load(tokenizer).train


def _train_and_valid(source, config: DataConfig, tokenizer):
  """A source's train and validation documents: its own validation set, else
  DataConfig.valid_source, else a seeded split."""
  loaded = source.load(tokenizer)
  valid = loaded.valid
  if valid is None and config.valid_source is not None:
    valid = _valid_documents(config, tokenizer)
  if valid is not None:
    return loaded.train, valid
  return split_train_valid(loaded.train, config.valid_fraction, config.seed,
                           name=f"source {source.name!r}")


def _eval_batches(valid, name: str, config: DataConfig, tokenizer) -> list[Batch]:
  rows = PackedRows(valid, config.seq_len, tokenizer.bos_id, tokenizer.eos_id,
                    getattr(tokenizer, "pad_id", 0), name=f"the valid split of source {name!r}")
  return eval_batches(rows, config.eval_batch_size or config.batch_size,
                      config.eval_batches_to_build())


def build_eval_sets(config: DataConfig, eval_domains: Sequence[Any] = ()) -> dict[str, list]:
  """The eval batches of every source and of `eval_domains`, exactly as build_datasets makes
  them, without packing any train rows (python -m jaxlm.eval needs only these)."""
  evaluation, tokenizer = {}, resolve_tokenizer(config.tokenizer)
  _add_eval_sets(evaluation, [*_sources_of(config), *_eval_domain_sources(eval_domains)], config,
                 tokenizer)
  return evaluation


def _add_eval_sets(evaluation: dict, sources, config: DataConfig, tokenizer) -> None:
  """The eval batches of each source not in `evaluation` yet (a domain the stage also trains on
  is evaluated once)."""
  for source in sources:
    if source.name not in evaluation:
      evaluation[source.name] = _eval_batches(_train_and_valid(source, config, tokenizer)[1],
                                              source.name, config, tokenizer)


def build_datasets(config: DataConfig, shard_index: int = 0, shard_count: int = 1, *,
                   start_rows: Mapping[str, int] | None = None,
                   eval_domains: Sequence[Any] = ()) -> Datasets:
  """Reads, tokenizes and splits every source; returns this host's train batches, the eval
  batches of every domain (not sharded: each host evaluates all of them) and the tokenizer.

  `start_rows` ({source: rows}) skips rows already drawn, e.g. an earlier stage's
  `train.rows_drawn(its num_steps)`, so a later stage continues each source instead of
  restarting it. `eval_domains` (EvalConfig.domains) are more sources evaluated, not trained.
  """
  tokenizer = resolve_tokenizer(config.tokenizer)
  found = _sources_of(config)
  pad_id = getattr(tokenizer, "pad_id", 0)
  train_rows, evaluation = {}, {}
  for source in found:
    train, valid = _train_and_valid(source, config, tokenizer)
    # A seeded document order, so that documents stored side by side (one file's worth, one
    # domain's worth) do not share rows in every epoch's first batches.
    order = np.random.default_rng(derived_seed(config.seed, "documents", source.name, bits=63)
                                  ).permutation(train.num_documents)
    train_rows[source.name] = PackedRows(
        train, config.seq_len, tokenizer.bos_id, tokenizer.eos_id, pad_id, order,
        name=f"the train split of source {source.name!r}")
    evaluation[source.name] = _eval_batches(valid, source.name, config, tokenizer)
    logger.info("source %r: train %d documents, %d tokens, %d rows of %d; valid %d documents, "
                "%d tokens, %d eval batches", source.name, train.num_documents, train.num_tokens,
                train_rows[source.name].num_rows, config.seq_len, valid.num_documents,
                valid.num_tokens, len(evaluation[source.name]))
  _add_eval_sets(evaluation, _eval_domain_sources(eval_domains), config, tokenizer)
  weights = _weights(config, found, train_rows)
  batches = TrainBatches(train_rows, weights, config.batch_size, config.seed, shard_index,
                         shard_count, start_rows)
  batches.log_proportions(PROPORTION_LOG_STEPS)
  return Datasets(batches, evaluation, tokenizer)
