"""Checkpoints through orbax: the train state (params, optimizer state, step) plus a JSON record
(stage, seed, data position, skipped-step count, the operative gin config).

Saves are asynchronous (the device-to-host copy is synchronous, so the next step may donate the
state's buffers) and atomic: orbax writes into a temporary directory and renames it when
complete, so a crash mid-save never leaves a checkpoint that looks complete. Checkpoints are
never pickled; they are tensorstore arrays and JSON.
"""

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxlm.errors import UserError

log = logging.getLogger("jaxlm")
CORRUPT_DIR = "corrupt_checkpoints"


class Checkpointer:
  """Saves on a step and/or wall-clock cadence; keeps the last `keep_last` plus every
  `keep_every`-th step; restores the newest checkpoint that reads back intact."""

  def __init__(self, model_dir: str, every_steps: int | None = None,
               every_secs: float | None = None, keep_last: int | None = 3,
               keep_every: int | None = None, read_only: bool = False):
    self.model_dir = os.path.abspath(model_dir)
    self.directory = os.path.join(self.model_dir, "checkpoints")
    save = [policies.FixedIntervalPolicy(every_steps)] if every_steps else []
    if every_secs:
      save.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=int(every_secs)))
    keep = [policies.LatestN(keep_last)] if keep_last else [policies.PreserveAll()]
    if keep_every:
      keep.append(policies.EveryNSteps(keep_every))
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only,
            save_decision_policy=policies.AnySavePolicy(save or [policies.SpecificStepsPolicy(())]),
            preservation_policy=policies.AnyPreservationPolicy(keep)))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Save if the cadence says so (or `force`); returns whether a save started."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_state(self, step: int, target=None):
    """Restore into `target`'s structure, shapes and shardings (ShapeDtypeStructs), or, with no
    target, as saved (nested dicts and lists of arrays)."""
    args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
    return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def restore_latest(self, make_target) -> tuple[int, dict, object] | None:
    """(step, meta, state) of the newest checkpoint that reads back, or None if there is none.

    `make_target(meta)` gives the restore target for a checkpoint's record. A checkpoint that
    fails to read (a truncated or missing file) is reported and moved to corrupt_checkpoints/
    (kept, never deleted), and the previous one is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self.restore_meta(step)
        return step, meta, self.restore_state(step, make_target(meta))
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax raise many types)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        self._quarantine(step)
        log.warning("checkpoint %d is unreadable (%s: %s); moved it to %s/ and falling back to "
                    "the previous checkpoint", step, type(e).__name__, reason, CORRUPT_DIR)
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
