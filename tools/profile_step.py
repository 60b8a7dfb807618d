"""Where the trainer's step spends its time on this device, by part of the model and by op.

    python tools/profile_step.py --configs=bench-tiny,bench-small --dtype=float32 --steps=5

For each config of jaxlm/benchmarking.py it compiles the trainer's own step (as tools/bench.py
does), runs a few warm-up steps, then records `--steps` steps with jax.profiler. Every op the
runtime executed (on CPU: each XLA thunk, mostly fusions) is mapped to its HLO instruction's
op_name, which carries the model's module path and the primitive, and its time is summed by
(part, pass, primitive): part from the module path (attention, mlp, norm, embed, head and loss,
optimizer update), pass forward or backward (`transpose(` in the op_name). Ops run concurrently
on the thread pool, so the shares are of the summed op time, not of the step's wall time, which
is printed beside them. The raw trace stays under --out for a trace viewer (Perfetto).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax

from jaxlm.benchmarking import CONFIGS, benchmark_stage, compiled_train_step, random_batch

PARTS = (("optimizer", "optimizer"), ("attention", "attention"), ("mlp", "mlp"),
         ("norm", "norm"), ("embed", "embed"), ("head and loss", "head"),
         ("head and loss", "cross_entropy"), ("head and loss", "loss"))


def part_of(op_name: str) -> str:
  lowered = op_name.lower()
  return next((part for part, key in PARTS if key in lowered), "other")


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its metadata op_name} of a compiled program's HLO text."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", line)
    if match:
      op = re.search(r'op_name="([^"]*)"', match.group(2))
      names[match.group(1)] = op.group(1) if op else ""
  return names


def breakdown(trace_events: list[dict], names: dict[str, str], steps: int) -> list[dict]:
  """Rows {part, pass, primitive, ms_per_step, share}, largest first."""
  totals = collections.Counter()
  for event in trace_events:
    if event.get("ph") == "X" and event.get("name") in names and "dur" in event:
      op = names[event["name"]]
      primitive = op.rsplit("/", 1)[-1].split("[")[0] if op else "?"
      direction = "backward" if "transpose(" in op else "forward"
      part = part_of(op)
      if part == "optimizer":
        direction = "update"
      totals[part, direction, primitive] += event["dur"]
  total = sum(totals.values()) or 1.0
  return [{"part": part, "pass": direction, "primitive": primitive,
           "ms_per_step": us / steps / 1e3, "share": us / total}
          for (part, direction, primitive), us in totals.most_common()]


def profile(config: str, dtype: str, steps: int, warmup: int, out: str) -> dict:
  bench = CONFIGS[config]
  stage = benchmark_stage(bench, dtype, steps + warmup + 1)
  step, _, compiled = compiled_train_step(stage, random_batch(bench))
  for _ in range(warmup):
    step()
  trace_dir = os.path.join(out, f"{config}-{dtype}")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(steps):
    step()
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  rows = breakdown(events, op_names(compiled.as_text()), steps)
  return {"config": config, "dtype": dtype, "step_ms": wall * 1e3, "trace": path, "rows": rows}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/profile_step.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="bench-tiny")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--top", type=int, default=25, help="rows printed per config")
  parser.add_argument("--out", default="/tmp/jaxlm_profile")
  args = parser.parse_args(argv)
  unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
  if unknown or args.steps < 1:
    problem = f"unknown config {unknown[0]!r}" if unknown else f"--steps={args.steps}"
    print(f"profile_step: error: {problem}; give configs among {', '.join(CONFIGS)} and "
          "--steps >= 1", file=sys.stderr)
    return 2
  results = [profile(c, args.dtype, args.steps, args.warmup, args.out)
             for c in args.configs.split(",")]
  for result in results:
    by_part = collections.Counter()
    for row in result["rows"]:
      by_part[row["part"], row["pass"]] += row["share"]
    print(f"\n{result['config']} {result['dtype']}: {result['step_ms']:.1f} ms per step (wall)")
    print("  by part: " + ", ".join(f"{part} {direction} {100 * share:.1f}%"
                                    for (part, direction), share in by_part.most_common()))
    for row in result["rows"][:args.top]:
      print(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.2f} ms  {row['part']:<13} "
            f"{row['pass']:<8} {row['primitive']}")
  with open(os.path.join(args.out, "profile.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
