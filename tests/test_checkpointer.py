"""Checkpointer keep policies and metadata reads, on a tiny pytree (no trainer). CI runs this file
again with the oldest orbax-checkpoint that pyproject.toml allows."""

import dataclasses
import re

import jax.numpy as jnp
import pytest

from jaxlm.checkpointing.checkpoint import RECORD_VERSION, Checkpointer, DataPosition, RunRecord
from jaxlm.errors import UserError


def _save_steps(model_dir, steps, **policy):
  checkpointer = Checkpointer(str(model_dir), every_steps=1, **policy)
  for step in steps:
    state = {"params": {"w": jnp.full((2, 3), float(step))}, "step": jnp.asarray(step)}
    assert checkpointer.save(step, state, RunRecord(step=step, gin_config="", stage_index=0))
  checkpointer.close()
  return Checkpointer(str(model_dir), read_only=True)


@pytest.mark.parametrize("policy, kept", [
    ({"keep_last": None}, [1, 2, 3, 4, 5, 6]),  # None keeps every checkpoint.
    ({"keep_last": 2}, [5, 6]),
    ({"keep_last": 1, "keep_every": 3}, [3, 6]),
    ({"keep_last": 2, "keep_every": 4}, [4, 5, 6]),
])
def test_keep_policies(tmp_path, policy, kept):
  assert _save_steps(tmp_path / "run", range(1, 7), **policy).all_steps() == kept


@pytest.mark.parametrize("policy, message", [
    ({"keep_last": -1}, "keep_checkpoints must be an integer in [1, inf) or None"),
    ({"keep_last": 0}, "keep_checkpoints must be"),
    ({"keep_every": 0}, "keep_checkpoint_every must be"),
    ({"every_steps": -5}, "checkpoint_every must be"),
    ({"every_secs": float("nan")}, "checkpoint_every_secs must be"),
])
def test_policies_that_would_delete_everything_are_refused(tmp_path, policy, message):
  with pytest.raises(UserError, match=re.escape(message)):
    Checkpointer(str(tmp_path / "run"), **policy)
  assert not (tmp_path / "run").exists()


def test_saved_shapes_come_from_metadata(tmp_path):
  checkpointer = _save_steps(tmp_path / "run", [7], keep_last=None)
  assert checkpointer.saved_shapes(7) == {"params/w": (2, 3), "step": ()}
  assert checkpointer.restore_record(7) == RunRecord(step=7, gin_config="", stage_index=0)


def test_the_record_reads_its_own_json_and_the_first_layouts():
  record = RunRecord(step=9, gin_config="x = 1", stage_index=1, stage_name="b", seed=3,
                     learning_rate=1e-3, data=DataPosition(4, 8, {"a": 16}, {"a": 32}),
                     skipped_steps=2, ledger={"flops": 1.0, "tokens": 5},
                     memory={"memory/param_bytes": 64.0})
  assert RunRecord.from_json(record.to_json()) == record
  unversioned = {k: v for k, v in record.to_json().items()
                 if k not in ("version", "converted_from", "memory")}
  # Written before records had a version (and, in version 1, before they kept the memory).
  assert RunRecord.from_json(unversioned) == dataclasses.replace(record, memory={})
  first_conversion = {"converted_from": "/hf", "format": "huggingface", "model_gin": "y = 2"}
  assert RunRecord.from_json(first_conversion) == RunRecord(step=0, gin_config="y = 2",
                                                            converted_from="/hf")
  with pytest.raises(UserError, match=f"layout version {RECORD_VERSION + 98}, newer than this "
                                      "jaxlm's"):
    RunRecord.from_json({**record.to_json(), "version": RECORD_VERSION + 98})
  with pytest.raises(ValueError, match="does not have the expected fields"):
    RunRecord.from_json({"step": 1})
