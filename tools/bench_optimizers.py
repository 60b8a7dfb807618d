"""Memory and step time of each memory-efficient method on one model: AdamW against GaLore,
Muon and SLTrain (AdamW on the model with parameterization = "sltrain").

    python tools/bench_optimizers.py --model=gin/models/125m.gin --seq_len=128 --batch_size=4

For each method (a fresh process each) this builds the trainer's train step for the model
(float32, one device, a constant learning rate), and reports the bytes of the params (with
SLTrain's support indices) and of the optimizer state (whole trees, jaxlm/training/memory.py),
their sum, XLA's planned temporaries for the step, and the step time: the median of --steps ordinary steps, and for GaLore the median of
the steps that refresh its projectors (an SVD of every selected gradient; measured with a
projector refresh every 4 steps) amortised over --update_proj_gap steps:

    ordinary + (refresh - ordinary) / update_proj_gap

Ratios are against AdamW measured in the same invocation. `--memory_only` gives the bytes alone,
from the trees' shapes without compiling or running a step, for a model too large to train
here (`--model=gin/models/1b.gin --rank=512 --memory_only`: GaLore's 1B setting).
"""

import argparse
import os
import statistics
import sys
import time

from jaxlm import benchmarking as bench

OPTIMIZERS = ("adamw", "galore", "muon", "sltrain")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED_GAP = 4  # GaLore refreshes every 4 steps while timed: steps 0, 4, 8, ... of optax's.


def model_config(path: str, seq_len: int, sltrain: bool):
  """The model of the gin file; for SLTrain with the paper's 130M settings (rank 256, alpha 16,
  density 0.03)."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxlm.model import ModelConfig  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin.parse_config_file(path)
  if sltrain:
    gin.parse_config_file(os.path.join(REPO_ROOT, "gin", "parameterization", "sltrain.gin"))
  return ModelConfig(max_seq_len=seq_len)


def _factory(name: str, rank: int):
  """The stage's optimizer factory: adamw (for SLTrain too), or GaLore / Muon (given the
  model) with its settings."""
  from jaxlm.optim import matrix_optimizers  # pylint: disable=import-outside-toplevel
  from jaxlm.optim.optimizers import adamw  # pylint: disable=import-outside-toplevel
  if name in ("adamw", "sltrain"):
    return lambda schedule: adamw(schedule, **bench.ADAMW)
  if name == "galore":
    return lambda schedule, model: matrix_optimizers.galore(
        schedule, rank=rank, update_proj_gap=MEASURED_GAP, model=model, **bench.ADAMW)
  return lambda schedule, model: matrix_optimizers.muon(schedule, model=model, **bench.ADAMW)


def measure(name: str, model_path: str, seq_len: int, batch_size: int, steps: int,
            rank: int, memory_only: bool = False) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jaxlm.training.train_step import init_state  # pylint: disable=import-outside-toplevel
  from jaxlm.training.memory import memory_accounting  # pylint: disable=import-outside-toplevel
  from jaxlm.training.stages import Stage  # pylint: disable=import-outside-toplevel
  model = model_config(model_path, seq_len, sltrain=name == "sltrain")
  spec = bench.BenchConfig(vocab_size=model.vocab_size, d_model=model.d_model,
                           num_layers=model.num_layers, num_heads=model.num_heads,
                           mlp_dim=model.mlp_dim, seq_len=seq_len, batch_size=batch_size)
  stage = Stage(num_steps=1000, model=model,
                schedule=lambda _: optax.constant_schedule(bench.LEARNING_RATE),
                optimizer=_factory(name, rank))
  state = jax.eval_shape(lambda: init_state(stage, jax.random.key(0)))
  executable, timing = None, {}
  if not memory_only:
    step, compile_s, executable = bench.compiled_train_step(stage, bench.random_batch(spec))
    times = []
    for _ in range(steps):  # Optax's count 0, 1, 2, ...: GaLore refreshes at multiples of 4.
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    refresh = [t for i, t in enumerate(times) if i % MEASURED_GAP == 0 and i > 0]
    ordinary = [t for i, t in enumerate(times) if i % MEASURED_GAP and i > 1]
    timing = {"ordinary_s": statistics.median(ordinary), "refresh_s": statistics.median(refresh),
              "compile_s": compile_s}
  memory = memory_accounting(state, executable, model)  # No executable: the trees alone.
  return {"param_bytes": memory["memory/param_bytes"] + memory["memory/support_bytes"],
          "opt_bytes": memory["memory/optimizer_state_bytes"],
          "temp_bytes": memory.get("memory/xla_temp_bytes_per_device"), **timing}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="gin/models/125m.gin")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--steps", type=int, default=13, help="timed steps (refreshes included)")
  parser.add_argument("--rank", type=int, default=128, help="GaLore's rank")
  parser.add_argument("--update_proj_gap", type=int, default=200,
                      help="GaLore's refresh period the refresh cost is amortised over")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--memory_only", action="store_true",
                      help="bytes only, from shapes: no step compiled or timed")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  flags = [f"--model={args.model}", f"--seq_len={args.seq_len}",
           f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--rank={args.rank}",
           *(["--memory_only"] if args.memory_only else [])]
  if args.worker:
    import json  # pylint: disable=import-outside-toplevel
    print("RESULT " + json.dumps(measure(args.worker, args.model, args.seq_len,
                                         args.batch_size, args.steps, args.rank,
                                         args.memory_only)))
    return 0
  names = args.optimizers.split(",")
  unknown = sorted(set(names) - set(OPTIMIZERS))
  if unknown or (args.steps < 2 * MEASURED_GAP + 1 and not args.memory_only):
    print(f"bench_optimizers: choose --optimizers from {list(OPTIMIZERS)} and --steps >= "
          f"{2 * MEASURED_GAP + 1}", file=sys.stderr)
    return 2
  rows = bench.worker_rows("bench_optimizers", os.path.abspath(__file__), names, flags)
  if rows is None:
    return 1
  base = rows.get("adamw")
  print(f"{args.model}, sequence {args.seq_len}, batch {args.batch_size}, float32, 1 CPU device "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M')}; GaLore rank {args.rank}, "
        f"refresh amortised over {args.update_proj_gap} steps\n")
  print("| method | params MiB | optimizer state MiB | vs AdamW | params + state MiB | vs AdamW | "
        "XLA temporaries MiB | ordinary step s | refresh step s | amortised s | vs AdamW |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  versus = lambda mine, key: "-" if base is None else f"{mine / base[key]:.2f}x"
  mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
  for row in rows.values():
    row["total_bytes"] = row["param_bytes"] + row["opt_bytes"]
  for name, row in rows.items():
    times = "- | - | - | -"
    if not args.memory_only:
      refreshes = name == "galore"  # Only GaLore's steps differ by the optimizer's count.
      amortised = row["ordinary_s"] + (
          (row["refresh_s"] - row["ordinary_s"]) / args.update_proj_gap if refreshes else 0.0)
      refresh = f"{row['refresh_s']:.2f}" if refreshes else "-"
      times = (f"{row['ordinary_s']:.2f} | {refresh} | {amortised:.2f} | "
               f"{versus(amortised, 'ordinary_s')}")
    print(f"| {name} | {mib(row['param_bytes'])} | {mib(row['opt_bytes'])} | "
          f"{versus(row['opt_bytes'], 'opt_bytes')} | {mib(row['total_bytes'])} | "
          f"{versus(row['total_bytes'], 'total_bytes')} | {mib(row['temp_bytes'])} | {times} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
