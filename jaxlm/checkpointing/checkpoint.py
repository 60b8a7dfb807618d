"""Checkpoints through orbax: the train state (params, optimizer state, step) plus its RunRecord
(stage, seed, data position, skipped-step count, the operative gin config), a versioned JSON
record written and read only here.

Saves are asynchronous (the device-to-host copy is synchronous, so the next step may donate the
state's buffers) and atomic: orbax writes into a temporary directory and renames it when
complete, so a crash mid-save never leaves a checkpoint that looks complete. Checkpoints are
never pickled; they are tensorstore arrays and JSON.
"""

import dataclasses
import logging
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxlm.errors import UserError
from jaxlm.tree_names import flatten_names
from jaxlm.validation import check_range

log = logging.getLogger("jaxlm")
CORRUPT_DIR = "corrupt_checkpoints"


RECORD_VERSION = 2  # Records without a version are jaxlm's first layout; 2 adds `memory`.


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where the checkpoint's stage stands in its data: the rows of each source drawn before the
  stage began and by its end (a later stage continues from there), and steps into the stage."""
  stage_step: int = 0
  stage_steps: int = 0
  rows_before_stage: dict[str, int] = dataclasses.field(default_factory=dict)
  rows_after_stage: dict[str, int] = dataclasses.field(default_factory=dict)

  def rows_at_checkpoint(self) -> tuple[dict[str, int], int]:
    """(rows drawn before the stage, steps into it); at the stage's end, the rows drawn after
    it and 0 (a branch from there starts afresh on the next rows)."""
    if self.stage_steps and self.stage_step == self.stage_steps:
      return dict(self.rows_after_stage), 0
    return dict(self.rows_before_stage), self.stage_step


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a checkpoint says about itself besides its tensors. A training checkpoint names its
  stage; one converted from elsewhere (tools/convert.py) has no stage (`stage_index` None) and
  `gin_config` holds only its model's bindings: a restore source, not a run to resume."""
  step: int
  gin_config: str  # The operative gin config (a conversion: the ModelConfig bindings).
  stage_index: int | None = None
  stage_name: str | None = None
  seed: int = 0
  learning_rate: float | None = None  # The schedule's value at `step`.
  data: DataPosition = DataPosition()
  skipped_steps: int = 0  # Non-finite steps skipped so far.
  ledger: dict = dataclasses.field(default_factory=dict)  # ComputeLedger.record().
  eval_baseline: dict = dataclasses.field(default_factory=dict)  # Forgetting's reference losses.
  converted_from: str | None = None  # The Hugging Face directory a conversion read.
  # The stage's memory accounting (jaxlm/training/memory.py): memory/... bytes.
  memory: dict = dataclasses.field(default_factory=dict)
  version: int = RECORD_VERSION

  @property
  def is_conversion(self) -> bool:
    return self.stage_index is None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, raw: dict, where: str = "checkpoint") -> "RunRecord":
    """Raises ValueError for a record that is not one (damaged), UserError for a newer layout."""
    if not isinstance(raw, dict):
      raise ValueError(f"the {where} record is not a JSON object")
    raw = dict(raw)
    version = raw.pop("version", 0)
    if version > RECORD_VERSION:
      raise UserError(f"the {where} record has layout version {version}, newer than this "
                      f"jaxlm's {RECORD_VERSION}; upgrade jaxlm (pip install -U jaxlm)")
    if version == 0 and raw.get("format") == "huggingface":  # tools/convert.py's first layout.
      raw = {"step": 0, "gin_config": raw["model_gin"], "converted_from": raw["converted_from"]}
    raw["data"] = DataPosition(**raw.get("data", {}))
    raw["ledger"] = raw.get("ledger") or {}
    raw["memory"] = raw.get("memory") or {}
    try:
      record = cls(**raw)
    except TypeError as e:  # A missing or an unknown key.
      raise ValueError(f"the {where} record does not have the expected fields ({e})") from None
    if not isinstance(record.gin_config, str) or not isinstance(record.step, int):
      raise ValueError(f"the {where} record has no gin config or step")
    return record


class _DropReadOnlyNotices(logging.Filter):
  """orbax warns on every read-only manager it opens (restore sources, pre-flight reads)."""

  def filter(self, record):
    message = record.getMessage()
    return not ("read_only=True" in message or "directory is read only" in message)


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())


def _silence_abandoned_reads() -> None:
  """A checkpoint that fails to read part-way leaves tensorstore reads in flight; their
  callbacks land on orbax's closed event loop and Python prints a traceback for each ("Event
  loop is closed", "Task exception was never retrieved"), dozens per checkpoint and possibly
  after the restore has returned. The failure itself is reported once, by restore_latest; these
  echoes are dropped for the life of the process (installed once, chaining the previous hooks).
  """
  if getattr(sys.excepthook, "jaxlm_quiet", False):
    return
  previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, traceback):  # Only the echo itself: never hide a real error.
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous_excepthook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook.jaxlm_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  logging.getLogger("asyncio").addFilter(
      lambda record: not (record.exc_info and _is_abandoned_read(record.exc_info[1])))


def _is_abandoned_read(error) -> bool:
  text = str(error)
  return ("Event loop is closed" in text or "Encountered error while reading array" in text
          or "tensorstore_spec" in text)


def _first_line(error: Exception) -> str:
  """The first line of an orbax/tensorstore error, short enough for one log line."""
  text = str(error).splitlines()[0][:200] if str(error) else ""
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_empty(leaf) -> bool:
  return hasattr(leaf, "shape") and math.prod(leaf.shape) == 0


def without_empty(tree):
  """`tree` with every zero-size array as None: orbax refuses to save them (GaLore keeps a (0, 0)
  projector for each vector it does not project), and they hold nothing to save."""
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def with_empty(restored, target):
  """`restored` (saved `without_empty`) with target's zero-size arrays back in place."""
  leaves, treedef = jax.tree.flatten(target)
  kept = iter(jax.tree.leaves(restored))
  return treedef.unflatten([
      jax.device_put(np.zeros(x.shape, x.dtype), getattr(x, "sharding", None))
      if _is_empty(x) else next(kept) for x in leaves])


def restore_saved_part(directory: str, step: int, target: dict, on_host: bool = False):
  """The parts of the state saved at checkpoints/`step` that `target` names (see
  Checkpointer.restore_part); needs no CheckpointManager, so one tensor can be read at a time.
  on_host: as numpy arrays in this process (every process reads its own copy), not onto the
  shardings of `target`'s leaves."""
  restore_args = jax.tree.map(
      lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray) if on_host else
      ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype),
      target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(
        os.path.join(directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))


def restore_saved_leaf(directory: str, step: int, path: tuple[str, ...], abstract,
                       on_host: bool = False):
  """One saved tensor, read alone: `path` is its keys from the state's root (("params",
  "layer_0", "mlp", "up"); dict keys only), `abstract` its ShapeDtypeStruct."""
  target = abstract
  for key in reversed(path):
    target = {key: target}
  value = restore_saved_part(directory, step, target, on_host)
  for key in path:
    value = value[key]
  return value


class Checkpointer:
  """Saves on a step and/or wall-clock cadence; keeps the last `keep_last` plus every
  `keep_every`-th step; restores the newest checkpoint that reads back intact."""

  def __init__(self, model_dir: str, every_steps: int | None = None,
               every_secs: float | None = None, keep_last: int | None = 3,
               keep_every: int | None = None, read_only: bool = False):
    check_range("keep_checkpoints", keep_last, low=1, optional=True, integer=True)
    check_range("keep_checkpoint_every", keep_every, low=1, optional=True, integer=True)
    check_range("checkpoint_every", every_steps, low=1, optional=True, integer=True)
    check_range("checkpoint_every_secs", every_secs, low=0, low_open=True, optional=True)
    _silence_abandoned_reads()
    self.model_dir = os.path.abspath(model_dir)
    self.directory = os.path.join(self.model_dir, "checkpoints")
    save = [policies.FixedIntervalPolicy(every_steps)] if every_steps else []
    if every_secs:
      save.append(policies.ContinuousCheckpointingPolicy(
          minimum_interval_secs=max(1, round(every_secs))))
    # LatestN(None) keeps every checkpoint; it is in every orbax version pyproject allows
    # (PreserveAll is not).
    keep = [policies.LatestN(keep_last)]
    if keep_every:
      keep.append(policies.EveryNSteps(keep_every))
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            save_decision_policy=policies.AnySavePolicy(save or [policies.SpecificStepsPolicy(())]),
            preservation_policy=policies.AnyPreservationPolicy(keep)))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, record: RunRecord, force: bool = False) -> bool:
    """Save if the cadence says so (or `force`); returns whether a save started."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(without_empty(state)),
        meta=ocp.args.JsonSave(record.to_json())))

  def restore_record(self, step: int) -> RunRecord:
    raw = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return RunRecord.from_json(raw, f"checkpoint {step}")

  def saved_leaves(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
    """{"params/embed/embedding": its shape and dtype, ...} of the saved state, from its
    metadata only."""
    tree = self._manager.item_metadata(step)["state"]
    if not tree:  # Orbax gives an empty tree when the state's _METADATA file is gone.
      raise ValueError(f"checkpoint {step} has no readable tree metadata (state/_METADATA)")
    return {name: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
            for name, leaf in flatten_names(tree).items()}

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{"params/embed/embedding": shape, ...} of the saved state, from its metadata only."""
    return {name: leaf.shape for name, leaf in self.saved_leaves(step).items()}

  def restore_state(self, step: int, target=None):
    """Restore into `target`'s structure, shapes and shardings (ShapeDtypeStructs), or, with no
    target, as saved (nested dicts and lists of arrays)."""
    if target is None:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))["state"]
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(without_empty(target))))["state"]
    return with_empty(restored, target)

  def restore_part(self, step: int, target: dict):
    """Only the parts of the saved state that `target` names ({"params": abstract tree, ...},
    ShapeDtypeStructs with shardings): evaluation and sampling read the params and never the
    optimizer state."""
    return restore_saved_part(self.directory, step, target)

  def save_in_parts(self, step: int, parts, record: RunRecord) -> None:
    """Save a state that is never whole in memory: `parts` yields disjoint sub-trees (e.g.
    {"params": {"layer_0": {"mlp": {"up": array}}}}), each written before the next is made
    (orbax's partial save), then `record`. For conversions (tools/convert.py), not training."""
    try:
      from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UserError("saving a checkpoint in parts needs orbax-checkpoint >= 0.12: "
                      "pip install -U orbax-checkpoint") from None
    path = os.path.join(self.directory, str(step))
    if os.path.exists(path):
      raise UserError(f"{path} already exists; save into a new directory")
    os.makedirs(self.directory, exist_ok=True)
    for part in parts:
      partial.save(path, part)
    partial.finalize(path)
    if not os.path.isdir(os.path.join(path, "state")):  # Orbax names the item; check it did.
      raise RuntimeError(f"orbax's partial save wrote no state/ item in {path}; this orbax "
                         "version lays checkpoints out differently")
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(os.path.join(path, "meta"),
                                                       args=ocp.args.JsonSave(record.to_json()))
    self._manager.reload()

  def restore_latest(self, make_target) -> tuple[int, RunRecord, object] | None:
    """(step, record, state) of the newest checkpoint that reads back, or None if there is none.

    `make_target(step, record)` gives the restore target for a checkpoint's record, or raises
    UserError if the checkpoint does not fit the run (then nothing is moved). A checkpoint that
    fails to read (a truncated or missing file) is reported and moved to corrupt_checkpoints/
    (kept, never deleted), and the previous one is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        record = self.restore_record(step)
        target = make_target(step, record)
        return step, record, self.restore_state(step, target)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax raise many types)
        self._quarantine(step)
        older = [s for s in self.all_steps() if s < step]
        log.warning("checkpoint %d is unreadable (%s); moved it to %s/; %s", step,
                    _first_line(e), CORRUPT_DIR,
                    f"falling back to checkpoint {older[-1]}" if older else
                    "no older checkpoint: starting from step 0")
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.model_dir, CORRUPT_DIR, f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:  # Every process must see the move before re-listing steps.
      multihost_utils.sync_global_devices(f"jaxlm_quarantine_{step}")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def find_step(model_dir: str, step: int | None) -> tuple[Checkpointer, int]:
  """A read-only Checkpointer on model_dir and the step to read (its newest if None)."""
  if not os.path.isdir(os.path.join(model_dir, "checkpoints")):
    raise UserError(f"{model_dir!r} has no checkpoints/ folder; give the MODEL_DIR of a run "
                    "that has saved a checkpoint")
  checkpointer = Checkpointer(model_dir, read_only=True)
  steps = checkpointer.all_steps()
  chosen = steps[-1] if step is None and steps else step
  if chosen is None or chosen not in steps:
    checkpointer.close()
    raise UserError(f"no checkpoint at step {step} in {model_dir!r}; it has "
                    f"{steps or 'none yet'}" if step is not None else
                    f"{model_dir!r} has no checkpoint yet; train it first")
  return checkpointer, chosen
