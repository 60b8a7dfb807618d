"""Initialise a stage from another run's checkpoint (or a Hugging Face model directory), with a
regex assignment map (T5X's `RestoreCheckpointConfig(assignment_map=...)`): how continual
pretraining starts from a base run or a Hugging Face model, and how any stage loads part of a
checkpoint or renames what it loads.

Names are parameter paths joined with "/" (e.g. "layer_3/mlp/up"). For every parameter of the
new model, the first rule whose pattern fully matches its name decides its source: a
replacement string (regex groups allowed, e.g. ("layer_(\\d+)/(.*)", "layer_\\1/\\2")) or None
(keep the fresh initialisation). A name no rule matches loads the same name from the source if
it exists, and is freshly initialised otherwise. The report lists what was loaded, created and
skipped, and is written to MODEL_DIR/restore_report.json. A method's state (masks, growth
operators) loads from the same name when the source saved it with the same shape, and is
freshly initialised otherwise.

A Hugging Face Llama / Mistral / Qwen2 directory (config.json + safetensors) is a source too:
its params under jaxlm's names (jaxlm.interop.hf_import), read one tensor at a time. The stage's
model must match it: `Stage.model = @hf_model_config()` with `hf_model_config.path` the same
directory (experiments/continual/from_hf.gin).
"""

import dataclasses
import json
import logging
import os
import re
from typing import Any

import gin
import jax
import numpy as np

from jaxlm.checkpointing.checkpoint import find_step, restore_saved_leaf
from jaxlm.errors import UserError
from jaxlm.interop import hf_import, load_hf_config
from jaxlm.model.config import RUN_FIELDS, ModelConfig
from jaxlm.optim.state_layout import state_layout
from jaxlm.tree_names import flatten_names, path_name
from jaxlm.validation import check_field_types, check_range

log = logging.getLogger("jaxlm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  path: str  # Another run's MODEL_DIR, or a Hugging Face model directory (params only).
  step: int | None = None  # None: its latest checkpoint.
  include_optimizer: bool = False  # Also the optimizer state, exactly as saved (counts too).
  # Also continue every data source where the source run was at that step (the first stage's
  # data only; with the same DataConfig it reads exactly what the source would have read next):
  # a decay branched from a stable-phase checkpoint (MiniCPM, arXiv:2404.06395).
  continue_data: bool = False
  assignment_map: tuple[tuple[str, str | None], ...] = ()
  # When the first stage's transitions turn the restored model into the stage's (upcycling,
  # growth or vocabulary expansion from another run): the model the source holds (None: a
  # Hugging Face directory's config.json, else the stage's own model) and the tokenizer it was
  # trained with (None: the stage's own; @byte_tokenizer() for bytes).
  model: Any = None
  tokenizer: Any = None

  def __post_init__(self):
    check_field_types(self)
    check_range("RestoreConfig.step", self.step, low=0, optional=True, integer=True)
    for rule in self.assignment_map:
      if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
        raise UserError(f"RestoreConfig.assignment_map rule {rule!r} is not a (pattern, "
                        "replacement or None) pair")
      try:
        re.compile(rule[0])
      except (re.error, TypeError) as e:
        raise UserError(f"RestoreConfig.assignment_map pattern {rule[0]!r} is not a regular "
                        f"expression ({e})") from None


@dataclasses.dataclass
class RestoreReport:
  loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (target, source)
  created: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # Source tensors not used.


def source_name(target: str, assignment_map) -> tuple[str | None, bool]:
  """(source name or None, whether a rule decided it)."""
  for pattern, replacement in assignment_map:
    match = re.fullmatch(pattern, target)
    if match:
      return (None if replacement is None else match.expand(replacement)), True
  return target, False


def _param_names_in(state, tx):
  """For every leaf of the train state, the parameter name it belongs to ("" for counters):
  an optimizer-state leaf's from the state's layout, when its path ends with that name."""
  names = jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), state.params)
  layout = state_layout(state.opt_state, state.params, tx)
  opt_names = jax.tree.structure(state.opt_state).unflatten([
      leaf.param if leaf.param and leaf.name.endswith("/" + leaf.param) else ""
      for leaf in layout])
  return state.replace(step="", params=names, opt_state=opt_names,
                       method_state=jax.tree.map(lambda _: "", state.method_state))


def is_hf_directory(path: str) -> bool:
  """A Hugging Face model directory (config.json, no jaxlm checkpoints/)."""
  return (os.path.isfile(os.path.join(path, "config.json")) and
          not os.path.isdir(os.path.join(path, "checkpoints")))


class _RunSource:
  """Another jaxlm run's checkpoint: shapes from its metadata, tensors read on first use."""

  def __init__(self, config: RestoreConfig):
    if not os.path.isdir(os.path.join(config.path, "checkpoints")):
      raise UserError(f"cannot restore from {config.path!r}: it has no checkpoints/ folder (nor "
                      "config.json); set RestoreConfig.path to another run's MODEL_DIR or a "
                      "Hugging Face model directory")
    self._checkpointer, self.step = find_step(config.path, config.step)
    self._leaves = self._checkpointer.saved_leaves(self.step)
    self.shapes = {name: leaf.shape for name, leaf in self._leaves.items()}
    self._whole = None  # The whole saved state, read only if a non-param tensor is asked for.

  def data_position(self) -> tuple[dict[str, int], int]:
    """(rows of each source drawn before the checkpoint's stage, steps into that stage); at the
    stage's end, the rows drawn after it, and 0."""
    return self._checkpointer.restore_record(self.step).data.rows_at_checkpoint()

  def learning_rate(self) -> float | None:
    return self._checkpointer.restore_record(self.step).learning_rate

  def read(self, name: str) -> np.ndarray:
    """A param is read alone (a weights-only restore never holds the source's optimizer
    state); optimizer state, whose saved tree has lists, comes from one whole restore."""
    if name.startswith("params/"):
      return np.asarray(restore_saved_leaf(self._checkpointer.directory, self.step,
                                           tuple(name.split("/")), self._leaves[name],
                                           on_host=True))
    if self._whole is None:
      self._whole = flatten_names(self._checkpointer.restore_state(self.step))
    return np.asarray(self._whole[name])

  def close(self) -> None:
    self._checkpointer.close()


class _HFSource:
  """A Hugging Face Llama-family directory (jaxlm.interop): its params only, checked from the
  safetensors metadata and read one tensor at a time, so starting a run from a 7B model never
  holds a second copy of it on the host."""
  step = 0

  def __init__(self, config: RestoreConfig):
    if config.include_optimizer:
      raise UserError(f"{config.path!r} is a Hugging Face model directory, which has no "
                      "optimizer state; set RestoreConfig.include_optimizer = False")
    if config.step is not None or config.continue_data:
      raise UserError(f"{config.path!r} is a Hugging Face model directory, which has no steps or "
                      "data position; leave RestoreConfig.step and continue_data unset")
    self._params = hf_import.HFParams(config.path, load_hf_config(config.path))
    self.shapes = {"params/" + "/".join(path): shape
                   for path, shape in self._params.shapes.items()}

  def learning_rate(self) -> None:  # A model directory has no schedule.
    return None

  def read(self, name: str) -> np.ndarray:
    return self._params.read(tuple(name.split("/")[1:]))

  def close(self) -> None:
    pass


def _open_source(config: RestoreConfig):
  return _HFSource(config) if is_hf_directory(config.path) else _RunSource(config)


def source_data_position(config: RestoreConfig) -> tuple[dict[str, int], int]:
  """Where the source run's data was at the restored step: (rows of each source drawn before
  that checkpoint's stage, steps into the stage)."""
  source = _open_source(config)
  try:
    return source.data_position()
  finally:
    source.close()


def source_learning_rate(config: RestoreConfig) -> float | None:
  """The learning rate the source run's schedule gave at the restored step (what its next
  update would have used; recorded with each checkpoint), or None: a Hugging Face directory,
  or a run saved before jaxlm recorded it."""
  source = _open_source(config)
  try:
    return source.learning_rate()
  finally:
    source.close()


def stage_source_learning_rate(stage) -> float | None:
  """`source_learning_rate` of a stage's restore_from (for stages.stage_schedules)."""
  return source_learning_rate(stage.restore_from)


def assign_sources(config: RestoreConfig, state, tx, source_shapes: dict, step: int):
  """For every leaf of `state` (arrays or ShapeDtypeStructs), the checkpoint tensor it loads
  ("path" in `source_shapes`) or None (keep the leaf); plus the report. Raises UserError for a
  map that names a missing tensor or a shape that differs."""
  report = RestoreReport()

  def assign(path, leaf, param_name):
    path = path_name(path)
    in_params = path.startswith("params/")
    if path.startswith("method_state/"):  # A method's own state: the same tensor, if saved.
      if path in source_shapes and tuple(source_shapes[path]) == tuple(leaf.shape):
        return path
      report.created.append(path)
      return None
    if not in_params and not config.include_optimizer:
      return None
    if not param_name:  # A counter (the step, Adam's count): copied as saved, if at all.
      return None if path == "step" or path not in source_shapes else path
    mapped, by_rule = source_name(param_name, config.assignment_map)
    prefix = path[:len(path) - len(param_name)]
    if mapped is None or (not by_rule and prefix + mapped not in source_shapes):
      if in_params:
        report.created.append(path)
      return None
    if prefix + mapped not in source_shapes:
      raise UserError(f"assignment map sends {param_name!r} to {mapped!r}, which is not in the "
                      f"checkpoint at {config.path!r} step {step}")
    if tuple(source_shapes[prefix + mapped]) != tuple(leaf.shape):
      raise UserError(f"cannot load {prefix + mapped!r} {tuple(source_shapes[prefix + mapped])} "
                      f"into {path!r} {tuple(leaf.shape)}: shapes differ; map it elsewhere or "
                      "to None")
    if in_params:
      report.loaded.append((path, prefix + mapped))
    return prefix + mapped

  sources = jax.tree_util.tree_map_with_path(assign, state, _param_names_in(state, tx))
  used = {s for s in jax.tree.leaves(sources) if s is not None}
  report.skipped = sorted(k for k in source_shapes if k.startswith("params/") and k not in used)
  return sources, report


def source_model(config: RestoreConfig, stage_model: ModelConfig) -> ModelConfig:
  """The model a restore source holds: RestoreConfig.model, else a Hugging Face directory's
  config.json (run as the stage runs: its dtype, remat, attention), else the stage's model."""
  if config.model is not None:
    if not isinstance(config.model, ModelConfig):
      raise UserError(f"RestoreConfig.model must be a ModelConfig (@source/ModelConfig()), got "
                      f"{config.model!r}")
    return config.model
  if is_hf_directory(config.path):
    hf = load_hf_config(config.path)
    return dataclasses.replace(hf, **{name: getattr(stage_model, name) for name in RUN_FIELDS
                                      if name != "moe_dispatch" or hf.moe_blocks})
  return stage_model


def check_restore_source(config: RestoreConfig, state, tx) -> None:
  """Pre-flight: the source run and step exist and the map fits, from tensor metadata only."""
  source = _open_source(config)
  try:
    assign_sources(config, state, tx, source.shapes, source.step)
  finally:
    source.close()


def restore_into(config: RestoreConfig, state, tx, model_dir: str):
  """`state` (freshly initialised, sharded) with tensors loaded from another run's checkpoint or
  a Hugging Face directory, each placed on the devices before the next is read."""
  source = _open_source(config)
  try:
    sources, report = assign_sources(config, state, tx, source.shapes, source.step)
    restored = jax.tree.map(
        lambda leaf, name: leaf if name is None else jax.device_put(
            np.asarray(source.read(name), leaf.dtype), leaf.sharding),
        state, sources, is_leaf=lambda x: x is None)
  finally:
    source.close()
  _log_report(report, config, source.step, model_dir)
  return restored, report


def _log_report(report: RestoreReport, config: RestoreConfig, step: int, model_dir: str):
  log.info("restored from %s step %d: %d tensors loaded, %d created fresh, %d skipped",
           config.path, step, len(report.loaded), len(report.created), len(report.skipped))
  for label, items in (("created", report.created), ("skipped", report.skipped)):
    if items:
      log.info("  %s: %s%s", label, ", ".join(items[:8]), " ..." if len(items) > 8 else "")
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "restore_report.json"), "w", encoding="utf-8") as f:
      json.dump({"source": config.path, "step": step, **dataclasses.asdict(report)}, f, indent=1)
