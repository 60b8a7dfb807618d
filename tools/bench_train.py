"""Steady-state training throughput of a gin experiment: tokens/s and MFU.

    python tools/bench_train.py --gin_file=experiments/quickstart.gin --steps=200

Runs the real trainer (no eval, no checkpoints, no sample) into a temporary MODEL_DIR and prints
the median over its logged intervals, skipping the first (which follows compilation). MFU is
against the peak the trainer measures on the same device at start-up (see jaxlm/model/flops.py).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import jax

from jaxlm import train


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--log_every", type=int, default=10)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as model_dir:
    never = args.steps + 1
    code = train.main([
        *(f"--gin_file={f}" for f in args.gin_file),
        *(f"--gin_bindings={b}" for b in args.gin_bindings),
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.Stage.num_steps={args.steps}",
        f"--gin.TrainerConfig.log_every={args.log_every}",
        f"--gin.EvalConfig.every={never}", f"--gin.TrainerConfig.checkpoint_every={never}",
        "--gin.TrainerConfig.sample_tokens=0", "--gin.TrainerConfig.progress='log'",
        "--gin.TrainerConfig.tensorboard=False",
    ])
    if code:
      return code
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [r for r in map(json.loads, f) if "perf/tokens_per_sec" in r][1:]
  if not records:
    print("bench_train: too few steps to measure; raise --steps", file=sys.stderr)
    return 2
  tokens_per_sec = statistics.median(r["perf/tokens_per_sec"] for r in records)
  mfu = statistics.median(r["perf/mfu"] for r in records)
  step_time = statistics.median(r["perf/step_time_sec"] for r in records)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
  print(f"median over {len(records)} intervals of {args.log_every} steps: "
        f"{tokens_per_sec:,.0f} tokens/s, step {step_time * 1e3:.1f} ms, MFU {mfu:.1%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
