"""Training throughput of a mixture-of-experts model against the dense model with the same
active parameters, for each dispatch path.

    python tools/bench_moe.py --config=bench-tiny --steps=20

The dense model is tools/bench.py's config; the MoE model makes every block's MLP E experts
(default 8) of mlp_dim / k hidden units each with top-k routing (default 2), so that a token
multiplies as many MLP weights as in the dense model (the router's d_model x E more) while the
model holds E / k times the dense MLP weights. Each row
(a fresh process each) times jaxlm's real train step (float32, one device, the trainer's
adamw): the median of --steps steps with their min-max, tokens/s, its ratio to dense measured in
the same invocation, and XLA's compiled memory plan (arguments + temporaries, as tools/bench.py
reports it). On CPU, `jax.lax.ragged_dot` (the dropless path) is lowered to a dense product over
every expert, E/k times the MLP FLOPs; the capacity path computes capacity_factor times them.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

from jaxlm import benchmarking as bench

ARMS = ("dense", "capacity", "dropless")


def model_for(arm: str, config: str, experts: int, top_k: int, capacity_factor: float):
  spec = bench.CONFIGS[config]
  dense = spec.model_config("float32")
  if arm == "dense":
    return dense
  if dense.mlp_dim % top_k:
    raise SystemExit(f"bench_moe: mlp_dim {dense.mlp_dim} does not divide by top-k {top_k}")
  return dataclasses.replace(dense, moe_layers="all", num_experts=experts,
                             experts_per_token=top_k, expert_mlp_dim=dense.mlp_dim // top_k,
                             moe_dispatch=arm,
                             capacity_factor=capacity_factor)


def measure(config: str, arm: str, steps: int, experts: int, top_k: int,
            capacity_factor: float) -> dict:
  from jaxlm.model import flops  # pylint: disable=import-outside-toplevel
  spec = bench.CONFIGS[config]
  model = model_for(arm, config, experts, top_k, capacity_factor)
  stage = bench.benchmark_stage(spec, "float32", steps + 3, model=model)
  step, compile_s, executable = bench.compiled_train_step(stage, bench.random_batch(spec))
  for _ in range(2):
    step()  # Warm-up.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    metrics = step()
    times.append(time.perf_counter() - start)
  plan = executable.memory_analysis()
  dropped = [float(v) for k, v in metrics.items() if k.endswith("dropped_fraction")]
  return {"step_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "compile_s": compile_s, "tokens_per_step": spec.tokens_per_step,
          "plan_bytes": None if plan is None else
          plan.argument_size_in_bytes + plan.temp_size_in_bytes,
          "flops_per_token": flops.flops_per_token(model, spec.seq_len),
          "dropped": statistics.mean(dropped) if dropped else 0.0}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="bench-tiny", choices=sorted(bench.CONFIGS))
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  settings = dict(steps=args.steps, experts=args.experts, top_k=args.top_k,
                  capacity_factor=args.capacity_factor)
  if args.worker:
    print("RESULT " + json.dumps(measure(args.config, args.worker, **settings)))
    return 0
  arms = args.arms.split(",")
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    print(f"bench_moe: unknown arm {unknown[0]!r}; choose from {list(ARMS)}", file=sys.stderr)
    return 2
  rows = bench.worker_rows("bench_moe", os.path.abspath(__file__), arms, [
      f"--config={args.config}", *[f"--{k}={v}" for k, v in settings.items()]])
  if rows is None:
    return 1
  dense = rows.get("dense")
  print(f"{args.config}, float32, 1 CPU device ({os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}; MoE: "
        f"{args.experts} experts, top-{args.top_k}, capacity factor {args.capacity_factor}\n")
  print("| arm | step ms (min-max) | tokens/s | vs dense | active MFLOP/token | dropped | "
        "XLA plan MiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for arm, row in rows.items():
    tokens = row["tokens_per_step"] / row["step_s"]
    ratio = "-" if dense is None else f"{dense['step_s'] / row['step_s']:.2f}x"
    plan = "-" if row["plan_bytes"] is None else f"{row['plan_bytes'] / 2**20:,.0f}"
    print(f"| {arm} | {row['step_s'] * 1e3:.0f} ({row['min_s'] * 1e3:.0f}-"
          f"{row['max_s'] * 1e3:.0f}) | {tokens:,.0f} | {ratio} | "
          f"{row['flops_per_token'] / 1e6:.1f} | {row['dropped']:.1%} | {plan} | "
          f"{row['compile_s']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
