"""Continual-pretraining stages: a decay branched from another run's stable-phase checkpoint
continues that run exactly (weights, optimizer state, schedule position and data order); a
stage re-warms from where the previous one ended."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxlm.training import run_plan
from jaxlm.training import trainer
from jaxlm.errors import UserError
from jaxlm.optim.schedules import warmup_cosine, warmup_stable_decay
from jaxlm.checkpointing.restore import RestoreConfig, source_data_position
from helpers import QUIET, final_params, tiny_stage


def _wsd(**kwargs):
  return lambda n, previous_lr=0.0: warmup_stable_decay(n, peak_lr=3e-3, **kwargs)


def test_a_branched_decay_continues_the_stable_run_bit_for_bit(tmp_path, small_text_file):
  full_dir, branch_dir = tmp_path / "full", tmp_path / "branch"
  # The full run: warmup 2, stable, a 4-step linear decay at the end; checkpoints at 4 and 8.
  full = tiny_stage(small_text_file, 8, schedule=_wsd(warmup_steps=2, decay_steps=4))
  trainer.run(str(full_dir), [full], trainer=QUIET)
  # The branch: another run restored at step 4 (still stable) with its optimizer state and data
  # position, decaying over its 4 steps.
  branch = tiny_stage(small_text_file, 4, schedule=_wsd(warmup_steps=0, decay_fraction=1.0),
                  restore_from=RestoreConfig(path=str(full_dir), step=4, include_optimizer=True,
                                             continue_data=True))
  trainer.run(str(branch_dir), [branch], trainer=QUIET)
  step, want = final_params(full_dir)
  branch_step, got = final_params(branch_dir)
  assert (step, branch_step) == (8, 4)
  jax.tree.map(np.testing.assert_array_equal, got, want)

  # The branch read on from row 16 (4 steps x 4 rows), not from the first row, and from a
  # stage's last checkpoint the next rows are the ones after all of its 8 x 4.
  assert run_plan.branched_data_position(branch) == {"text": 16}
  assert source_data_position(RestoreConfig(path=str(full_dir), continue_data=True)) == (
      {"text": 32}, 0)


def test_a_continual_stage_re_warms_from_the_previous_final_lr(tmp_path, small_text_file):
  first = tiny_stage(small_text_file, 4, schedule=lambda n: warmup_cosine(
      n, peak_lr=4e-3, warmup_steps=1, final_lr_fraction=0.25))
  second = tiny_stage(small_text_file, 4, name="continual", schedule=lambda n, previous_lr=0.0:
                  warmup_cosine(n, peak_lr=2e-3, warmup_steps=2, warmup_from="previous",
                                previous_lr=previous_lr))
  config = trainer.TrainerConfig(**{**QUIET.__dict__, "log_every": 1})
  trainer.run(str(tmp_path), [first, second], trainer=config)
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    lrs = {r["step"]: r["train/learning_rate"] for r in map(json.loads, f)
           if "train/learning_rate" in r}
  # Step 5 is the continual stage's first update: it starts at the first stage's final 1e-3.
  np.testing.assert_allclose([lrs[5], lrs[6], lrs[7]], [1e-3, 1.5e-3, 2e-3], rtol=1e-6)
  # The weights pass the transition exactly: the continual stage's baseline evaluation at step
  # 4 equals the first stage's final one on the same held-out rows.
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    at_4 = [r["eval/loss"] for r in map(json.loads, f) if r["step"] == 4 and "eval/loss" in r]
  assert len(at_4) == 2 and at_4[0] == at_4[1]
  # A run that restores this one re-warms from where it ended: 2e-3 decayed to 2e-4.
  third = dataclasses.replace(second, name="again", restore_from=RestoreConfig(str(tmp_path)))
  trainer.run(str(tmp_path / "again"), [third], trainer=config)
  with open(tmp_path / "again" / "metrics.jsonl", encoding="utf-8") as f:
    lrs = {r["step"]: r["train/learning_rate"] for r in map(json.loads, f)
           if "train/learning_rate" in r}
  np.testing.assert_allclose([lrs[1], lrs[2], lrs[3]], [2e-4, 1.1e-3, 2e-3], rtol=1e-6)


def test_continue_data_from_a_hugging_face_directory_is_refused(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(UserError, match="no steps or data position"):
    source_data_position(RestoreConfig(path=str(tmp_path), continue_data=True))
