"""Subprocess worker for test_parallel.py: runs short CLI trainings on a forced device count
(XLA_FLAGS is set by the parent) and prints what they logged as one JSON line.

    python tests/mesh_worker.py '{"model_dir": ..., "corpus": ..., "runs": {name: [flags]}}'
"""

import json
import os
import sys

import jax

from conftest import as_defaults  # tests/ is this script's folder, so it is on sys.path.
from jaxlm import train

COMMON = [
    "--gin_file=experiments/quickstart.gin",
    "--gin.Stage.num_steps=20",
    "--gin.ModelConfig.d_model=64",
    "--gin.ModelConfig.num_layers=2",
    "--gin.ModelConfig.num_heads=4",
    "--gin.ModelConfig.num_kv_heads=4",
    "--gin.ModelConfig.mlp_dim=192",
    "--gin.DataConfig.source=@text_files",
    "--gin.DataConfig.seq_len=32",
    "--gin.DataConfig.batch_size=16",
    "--gin.DataConfig.max_eval_batches=1",
    "--gin.warmup_cosine.warmup_steps=5",
    "--gin.TrainerConfig.log_every=1",
    "--gin.EvalConfig.every=1000",
    "--gin.EvalConfig.baseline=False",
    "--gin.TrainerConfig.checkpoint_every=1000",
    "--gin.TrainerConfig.sample_tokens=0",
    "--gin.TrainerConfig.tensorboard=False",
    "--gin.TrainerConfig.peak_flops_per_device=1e12",
]
# Shared by runs whose own gin files override some of them in every stage: defaults, not errors.
COMMON = as_defaults(COMMON)


def main() -> int:
  spec = json.loads(sys.argv[1])
  losses = {}
  for name, flags in spec["runs"].items():
    model_dir = os.path.join(spec["model_dir"], name)
    code = train.main([*COMMON, f"--gin.text_files.paths='{spec['corpus']}'",
                       f"--gin.MODEL_DIR='{model_dir}'", *flags])
    if code:
      return code
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
        losses[name] = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  if jax.process_index() == 0:
    print("RESULT " + json.dumps(losses))
  return 0


if __name__ == "__main__":
  sys.exit(main())
