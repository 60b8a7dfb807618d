"""The training loop: a tiny model overfits, resume continues exactly, stages hand over."""

import json
import math
import shutil

import jax
import numpy as np
import pytest

from jaxlm import parallel
from jaxlm.training import trainer
from jaxlm.checkpointing.checkpoint import Checkpointer, DataPosition
from jaxlm.data.pipeline import build_datasets
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig
from jaxlm.optim.schedules import warmup_constant
from jaxlm.training.stages import Stage
from jaxlm.training.train_step import make_train_step, sharded_init, state_shardings
from helpers import QUIET, TINY, final_params, tiny_data, tiny_stage

def test_tiny_model_overfits_a_small_text_far_below_unigram_entropy(tmp_path):
  text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
          "How vexingly quick daft zebras jump! ") * 4
  path = tmp_path / "tiny.txt"
  path.write_text(text)
  tokens = ByteTokenizer().encode(text)
  counts = np.bincount(tokens)
  probs = counts[counts > 0] / counts.sum()
  unigram_entropy_nats = float(-(probs * np.log(probs)).sum())  # ~2.9 nats for this text.

  stage = Stage(num_steps=150, model=TINY, data=tiny_data(path, valid_source=lambda: [text]),
                schedule=lambda n: warmup_constant(n, peak_lr=1e-2, warmup_steps=10))
  mesh_config = parallel.MeshConfig()
  mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
  shardings = state_shardings(stage, mesh, rules)
  train_step = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))
  train_batches = build_datasets(stage.data).train
  state = sharded_init(stage, shardings, jax.random.key(0))
  for step in range(stage.num_steps):
    state, metrics = train_step(state, train_batches.batch_at(step))
  final_loss = float(metrics["train/loss"])
  # Memorising a 1 KB text takes a model with ~100K params to a small fraction of a nat; a
  # bug in masking, targets or the update leaves it near the unigram entropy (≥ 2.5 nats).
  assert final_loss < 0.25 * unigram_entropy_nats, (final_loss, unigram_entropy_nats)


# In-process twin of test_fault_tolerance's kill -9 resume (which runs by default).
@pytest.mark.slow
def test_resume_from_latest_continues_the_step_count_bitwise(tmp_path, small_text_file):
  full, interrupted = tmp_path / "full", tmp_path / "interrupted"
  result = trainer.run(str(full), [tiny_stage(small_text_file, 8)], trainer=QUIET)
  assert result["step"] == 8

  trainer.run(str(interrupted), [tiny_stage(small_text_file, 8)], trainer=QUIET)
  # Simulate a run that died after its step-4 checkpoint: drop everything after step 4.
  shutil.rmtree(interrupted / "checkpoints" / "8")
  with open(interrupted / "metrics.jsonl") as f:
    kept = [line for line in f if json.loads(line)["step"] <= 4]
  (interrupted / "metrics.jsonl").write_text("".join(kept))

  result = trainer.run(str(interrupted), [tiny_stage(small_text_file, 8)], trainer=QUIET)
  assert result["step"] == 8
  steps = [r["step"] for r in map(json.loads, open(interrupted / "metrics.jsonl"))
           if "train/loss" in r]
  assert sorted(set(steps)) == [2, 4, 6, 8] and steps.count(6) == 1  # Continued, not restarted.
  (step_a, params_a), (step_b, params_b) = final_params(full), final_params(interrupted)
  assert step_a == step_b == 8
  # Same data (a pure function of the step), same program: the resumed run is bit-identical.
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  losses = lambda d: [(r["step"], r["train/loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))
                      if "train/loss" in r]
  assert losses(full) == losses(interrupted)


def test_two_stages_hand_over_with_the_identity_transition(tmp_path, small_text_file):
  stages = [tiny_stage(small_text_file, 4, name="first"),
            tiny_stage(small_text_file, 4, name="second")]
  result = trainer.run(str(tmp_path / "run"), stages, trainer=QUIET)
  assert result["step"] == 8
  assert math.isfinite(result["eval/loss"])
  record = Checkpointer(str(tmp_path / "run")).restore_record(8)
  # 4 steps of 4 rows each: stage 2 starts after stage 1's 16 rows of the source.
  assert (record.stage_index, record.stage_name, record.data) == (1, "second", DataPosition(
      stage_step=4, stage_steps=4, rows_before_stage={"text": 16},
      rows_after_stage={"text": 32}))
  assert "warmup_cosine" in record.gin_config  # The operative gin config travels along.
  # Each stage's memory, logged at its first step and kept in the record: float32 params, and
  # AdamW's two moments of them (plus counters and the injected learning rate).
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    memory = [r for r in map(json.loads, f) if "memory/param_bytes" in r]
  assert [r["step"] for r in memory] == [0, 4]
  param_bytes = 4 * sum(x.size for x in jax.tree.leaves(final_params(tmp_path / "run")[1]))
  assert memory[0]["memory/param_bytes"] == param_bytes
  assert 2 * param_bytes < memory[0]["memory/optimizer_state_bytes"] < 2 * param_bytes + 64
  assert memory[0]["memory/xla_temp_bytes_per_device"] > 0
  assert record.memory == {k: v for k, v in memory[1].items() if k.startswith("memory/")}


def test_identity_transition_refuses_a_changed_model(tmp_path, small_text_file):
  wider = ModelConfig(**{**TINY.__dict__, "d_model": 128})
  stages = [tiny_stage(small_text_file, 2, name="small"),
            tiny_stage(small_text_file, 2, name="wide", model=wider)]
  with pytest.raises(UserError, match="identity"):
    trainer.run(str(tmp_path / "run"), stages, trainer=QUIET)
