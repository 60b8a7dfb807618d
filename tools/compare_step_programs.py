"""Whether two checkouts of jaxlm compile the benchmark train step to the same program.

    git worktree add /tmp/before HEAD~3
    python tools/compare_step_programs.py /tmp/before . --configs=bench-tiny,bench-small

(Both checkouts need jaxlm/benchmarking.py, which came with this tool.)

For each config of jaxlm/benchmarking.py, each checkout (imported through PYTHONPATH, in its own
process) lowers and compiles the train step as tools/bench.py builds it (float32, one device)
and prints XLA's optimized HLO; the two texts are compared without their source-location tables
(file names and line numbers differ between checkouts). The same program runs in the same time,
so a refactor that keeps it cannot have slowed the step. Exit 0 if every config matches, 1 if
one differs (the first differing lines are printed), 2 on bad input.
"""

import argparse
import difflib
import os
import re
import subprocess
import sys

# Source locations: HLO lists the files and (file, line, column) records before the code.
_LOCATION = re.compile(r'^\s*\d+ (\{|")')
_METADATA = re.compile(r", metadata=\{[^}]*\}")


def step_program(config: str) -> str:
  """The optimized HLO of the train step for `config`, without source locations."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlm import parallel  # pylint: disable=import-outside-toplevel
  from jaxlm.benchmarking import CONFIGS, benchmark_stage  # pylint: disable=import-outside-toplevel
  try:
    from jaxlm.training import train_step  # pylint: disable=import-outside-toplevel
  except ImportError:  # A checkout from before the subpackages (2026-12-07): jaxlm/train_step.py.
    from jaxlm import train_step  # pylint: disable=import-outside-toplevel
  make_train_step, sharded_init = train_step.make_train_step, train_step.sharded_init
  state_shardings = train_step.state_shardings
  bench = CONFIGS[config]
  stage = benchmark_stage(bench, "float32", num_steps=10)
  mesh_config = parallel.MeshConfig(data=1, fsdp=1, tensor=1)
  mesh, rules = parallel.make_mesh(mesh_config, jax.devices()[:1]), mesh_config.resolved_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(stage, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    state = jax.eval_shape(lambda: sharded_init(stage, shardings, jax.random.key(0)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                         shardings)
    shape = (bench.batch_size, bench.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
             for key, dtype in (("inputs", np.int32), ("targets", np.int32),
                                ("positions", np.int32), ("segment_ids", np.int32),
                                ("weights", np.float32))}
    text = make_train_step(stage, shardings, batch_sharding).lower(state, batch).compile().as_text()
  lines = [_METADATA.sub("", line) for line in text.splitlines()
           if not _LOCATION.match(line) and not line.startswith("HloModule ")]
  return "\n".join(lines)


def program_of(checkout: str, config: str) -> str:
  env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
  result = subprocess.run([sys.executable, os.path.abspath(__file__), "--print", config],
                          env=env, cwd=os.path.abspath(checkout), capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{checkout}: {result.stderr.strip().splitlines()[-1]}")
  return result.stdout


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("checkouts", nargs="*", help="two jaxlm checkouts: before and after")
  parser.add_argument("--configs", default="bench-tiny,bench-small")
  parser.add_argument("--print", metavar="CONFIG", help=argparse.SUPPRESS)  # The child's job.
  args = parser.parse_args(argv)
  if args.print:
    print(step_program(args.print))
    return 0
  if len(args.checkouts) != 2 or not all(os.path.isdir(os.path.join(c, "jaxlm"))
                                          for c in args.checkouts):
    print("compare_step_programs: error: give two checkouts of jaxlm (folders holding jaxlm/)",
          file=sys.stderr)
    return 2
  differ = False
  for config in args.configs.split(","):
    before, after = (program_of(c, config) for c in args.checkouts)
    same = before == after
    differ |= not same
    print(f"{config}: {'the same program' if same else 'DIFFERENT programs'} "
          f"({len(before.splitlines())} and {len(after.splitlines())} HLO lines)")
    if not same:
      diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
      print("\n".join(list(diff)[:20]))
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main())
