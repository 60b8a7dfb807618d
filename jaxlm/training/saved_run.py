"""A trained run, read back for evaluation and sampling: the model of the stage a checkpoint
was written in, rebuilt from the gin config saved in that checkpoint's record (no model flags
to repeat), and its params (plus any method state they need), never the optimizer state.

    run = load_saved_run("/tmp/run", step=None)        # the newest checkpoint
    run.stage.model, run.params, run.tokenizer, run.step

With `lazy_params=True` (and a stage whose methods do not change the params for evaluation),
each leaf of `run.params` is a SavedLeaf that reads its one tensor from the checkpoint only when
converted to an array: an export streams a model bigger than host memory.
"""

import contextlib
import dataclasses
import os
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm import parallel
from jaxlm.config import gin_config
from jaxlm.checkpointing.checkpoint import Checkpointer, RunRecord, find_step, restore_saved_leaf
from jaxlm.data.pipeline import DataConfig
from jaxlm.data.tokenizers import HuggingFaceTokenizer, resolve_tokenizer
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig
from jaxlm.evaluation.schedule import EvalConfig
from jaxlm.training.stages import Stage, configured_stages, stage_starts
from jaxlm.training.train_step import make_params_for_eval, sharded_abstract_state


@dataclasses.dataclass
class SavedRun:
  model_dir: str
  step: int
  stage: Stage  # The stage the checkpoint was written in.
  params: Any  # What the model is evaluated with (the stage's params_for_loss hooks applied).
  tokenizer: Any
  evaluation: EvalConfig  # The run's, with any extra domains bound by the caller's gin.
  mesh: Any
  rules: Any

  def scope(self):
    """The mesh and logical-axis rules under which the model runs (as the trainer's)."""
    return _scope(self.mesh, self.rules)


@contextlib.contextmanager
def _scope(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


@dataclasses.dataclass(frozen=True)
class SavedLeaf:
  """One saved param, read from the checkpoint by np.asarray (its shape and dtype without)."""
  directory: str  # The run's checkpoints/ folder.
  step: int
  path: tuple[str, ...]  # Keys under "params".
  abstract: jax.ShapeDtypeStruct  # With the sharding it is restored to.

  @property
  def shape(self):
    return self.abstract.shape

  @property
  def dtype(self):
    return self.abstract.dtype

  def __array__(self, dtype=None, copy=None):
    del copy  # A fresh array every time.
    value = restore_saved_leaf(self.directory, self.step, ("params", *self.path), self.abstract)
    return np.asarray(jax.device_get(value), dtype=dtype)


def _restore_params(checkpointer: Checkpointer, step: int, abstract, params_for_eval):
  target = {"params": abstract.params, "method_state": abstract.method_state}
  if not abstract.method_state:
    del target["method_state"]
  restored = checkpointer.restore_part(step, target)
  return params_for_eval(abstract.replace(step=step, params=restored["params"],
                                          method_state=restored.get("method_state", {})))


_NAMED_TRANSITIONS = re.compile(r"^(\S*Stage\.transition = )(\[[^\]@]*\]|'[^']*'|\"[^\"]*\")$",
                                re.MULTILINE)


def upgrade_saved_config(config_text: str) -> str:
  """A config saved before transitions were gin configurables named them as strings
  (`Stage.transition = ['grow_width']`); today they are references (`[@grow_width]`)."""
  def as_references(match):
    names = re.findall(r"['\"]([^'\"]+)['\"]", match.group(2))
    return match.group(1) + "[" + ", ".join(f"@{name}" for name in names) + "]"
  return _NAMED_TRANSITIONS.sub(as_references, config_text)


def stages_from_config(config_text: str, gin_files=(), gin_bindings=(), search_paths=()):
  """The run's stages from its saved gin config, then the caller's files and bindings (e.g. more
  EvalConfig.domains) on top."""
  gin_config.parse(list(gin_files), list(gin_bindings), list(search_paths),
                   base_config=upgrade_saved_config(config_text))
  return configured_stages()


def converted_stage(model_dir: str, record: RunRecord, gin_files=(), gin_bindings=(),
                    search_paths=()) -> Stage:
  """The one stage a converted checkpoint (tools/convert.py) is read with: its model's saved
  bindings, and the tokenizer.json the conversion copied beside it, if any."""
  gin_config.parse(list(gin_files), list(gin_bindings), list(search_paths),
                   base_config=record.gin_config)
  tokenizer_file = os.path.join(model_dir, "tokenizer.json")
  tokenizer = HuggingFaceTokenizer(tokenizer_file) if os.path.exists(tokenizer_file) else None
  return Stage(num_steps=1, name="converted", model=ModelConfig(),
               data=DataConfig(tokenizer=tokenizer))


def _binds_mesh(gin_files, gin_bindings) -> bool:
  """Whether the caller (not the saved config) sets the mesh: then it is used as given."""
  texts = [*gin_bindings, *(open(gin_config.resolve_gin_file(f, gin_config.search_paths()),
                                 encoding="utf-8").read() for f in gin_files)]
  return any(re.search(r"(^|\s|/)MeshConfig\.", text, re.M) for text in texts)


def load_saved_run(model_dir: str, step: int | None = None, gin_files=(), gin_bindings=(),
                   search_paths=(), lazy_params: bool = False) -> SavedRun:
  checkpointer, step = find_step(model_dir, step)
  try:
    record = checkpointer.restore_record(step)
    if record.is_conversion:
      stages, index = [converted_stage(model_dir, record, gin_files, gin_bindings,
                                       search_paths)], 0
    else:
      stages = stages_from_config(record.gin_config, gin_files, gin_bindings, search_paths)
      index = record.stage_index
    if index >= len(stages):
      raise UserError(f"the checkpoint at step {step} was written in stage {index}, but the "
                      f"saved config has {len(stages)} stages")
    stage = stages[index]
    mesh_config = parallel.MeshConfig()
    if not _binds_mesh(gin_files, gin_bindings):  # The saved mesh is the training machine's.
      mesh_config = parallel.mesh_for_devices(mesh_config, jax.device_count())
    mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
    with _scope(mesh, rules):
      abstract = sharded_abstract_state(stage, mesh, rules)
      if lazy_params and not any(m.params_for_loss for m in stage.methods):
        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: SavedLeaf(checkpointer.directory, step,
                                         tuple(k.key for k in path), leaf), abstract.params)
      else:
        params = _restore_params(checkpointer, step, abstract,
                                 make_params_for_eval(stage, stage_starts(stages)[index]))
  finally:
    checkpointer.close()
  return SavedRun(os.path.abspath(model_dir), step, stage, params,
                  resolve_tokenizer(stage.data.tokenizer), EvalConfig(), mesh, rules)
