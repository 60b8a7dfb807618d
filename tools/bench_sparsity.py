"""Step-time overhead of each sparsity algorithm over dense training, mask updates amortised.

    python tools/bench_sparsity.py --config=bench-small --steps=8 --period=100

For each algorithm (a fresh process each: dense, static 50%, 2:4 SR-STE, RigL 80% with its
mask update every --period steps, gradual pruning updating every --period steps) this times
jaxlm's real train step (tools/bench.py's model and batch, float32, one device): the median of
--steps ordinary steps and the median of 3 steps that update the masks (the step counter set to
an update step), and reports the amortised step time

    ordinary + (update - ordinary) / period

against dense's, as a ratio measured in the same invocation, plus the bytes the masks hold
(bool, one byte per masked weight) beside the params' bytes. On CPU (and GPU with dense
kernels) unstructured zeros are not skipped, so no algorithm can be faster than dense here.
"""

import argparse
import json
import os
import statistics
import sys
import time

from jaxlm import benchmarking as bench

ALGORITHMS = ("dense", "static", "nm", "rigl", "gradual")


def _method(name: str, period: int):
  from jaxlm.methods.sparsity import methods  # pylint: disable=import-outside-toplevel
  return {"dense": lambda: (),
          "static": lambda: (methods.static_sparsity(density=0.5),),
          "nm": lambda: (methods.nm_sparsity(),),
          "rigl": lambda: (methods.rigl(density=0.2, update_every=period),),
          "gradual": lambda: (methods.gradual_pruning(update_every=period, start_fraction=0.0,
                                                      end_fraction=1.0),)}[name]()


def measure(config: str, algorithm: str, steps: int, period: int) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxlm import parallel  # pylint: disable=import-outside-toplevel
  from jaxlm.training.train_step import (  # pylint: disable=import-outside-toplevel
      make_train_step, sharded_init, state_shardings)
  spec = bench.CONFIGS[config]
  stage = bench.benchmark_stage(spec, "float32", 100 * period, methods=_method(algorithm, period))
  mesh_config = parallel.MeshConfig(data=1, fsdp=1, tensor=1)
  mesh, rules = parallel.make_mesh(mesh_config, jax.devices()[:1]), mesh_config.resolved_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(stage, mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(0))
    batch = parallel.global_batch(bench.random_batch(spec),
                                  parallel.batch_sharding(mesh, rules))
    train_step = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))

    def run(at_step=None):
      nonlocal state
      if at_step is not None:
        state = state.replace(step=jax.device_put(jnp.int32(at_step), shardings.step))
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready((state, metrics))
      return time.perf_counter() - start, metrics

    run(1)  # Compile, and warm up on an ordinary step.
    run()
    ordinary = [run(1 + i % (period - 1))[0] for i in range(steps)]
    updates = [run(period)[0] for _ in range(3)]
    metrics = run(1)[1]
  masks = {k: float(v) for k, v in metrics.items() if k.endswith("/mask_bytes")}
  params = sum(x.nbytes for x in jax.tree.leaves(state.params))
  return {"ordinary_s": statistics.median(ordinary), "update_s": statistics.median(updates),
          "mask_bytes": sum(masks.values()), "param_bytes": params}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="bench-small", choices=sorted(bench.CONFIGS))
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--period", type=int, default=100)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(measure(args.config, args.worker, args.steps, args.period)))
    return 0
  rows = bench.worker_rows("bench_sparsity", os.path.abspath(__file__), args.algorithms.split(","), [
      f"--config={args.config}", f"--steps={args.steps}", f"--period={args.period}"])
  if rows is None:
    return 1
  dense = rows.get("dense")
  print(f"{args.config}, float32, 1 CPU device; amortised over a period of {args.period} steps\n")
  print("| algorithm | ordinary step (s) | mask-update step (s) | amortised (s) | vs dense | "
        "mask bytes | param bytes |")
  print("|---|---|---|---|---|---|---|")
  for name, row in rows.items():
    amortised = row["ordinary_s"] + (row["update_s"] - row["ordinary_s"]) / args.period
    ratio = "-" if dense is None else f"{amortised / dense['ordinary_s']:.3f}"
    print(f"| {name} | {row['ordinary_s']:.3f} | {row['update_s']:.3f} | {amortised:.3f} | "
          f"{ratio} | {row['mask_bytes']:,.0f} | {row['param_bytes']:,} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
