"""Peak host memory of tools/convert.py, both ways, on a random ~1B-parameter model.

    python tools/bench_convert.py                     # gin/models/1b.gin, 2 GiB shards
    python tools/bench_convert.py --model_gin=gin/models/125m.gin --max_shard_bytes=200000000

Writes (one tensor at a time, so the setup itself fits in memory) a random float32 Hugging Face
directory of the model and a jaxlm run checkpoint of it; then runs each conversion as its own
process and reads that process's peak resident set size (VmHWM, read by the process itself): hf_to_jaxlm from the
directory, jaxlm_to_hf from the run. The goal (issue 14) is a peak below 1.3 x (largest shard +
largest tensor); an idle interpreter with jax and jaxlm imported is shown as the floor every
process pays. Prints a markdown table.
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from jaxlm.config import gin_config
from jaxlm.checkpointing.checkpoint import Checkpointer
from jaxlm.interop import export_hf, gin_model_text
from jaxlm.model import ModelConfig, count_params
from jaxlm.model.transformer import init_params

CONVERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py")


class RandomLeaf:
  """A param's shape; its float32 values are drawn only when it is converted to an array."""

  def __init__(self, shape, seed):
    self.shape, self.seed = tuple(shape), seed

  def __array__(self, dtype=None, copy=None):
    del copy
    values = np.random.default_rng(self.seed).standard_normal(self.shape, np.float32)
    return values * np.float32(0.02) if dtype is None else (values * 0.02).astype(dtype)


def init_shapes(config: ModelConfig):
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def random_params(config: ModelConfig):
  leaves, treedef = jax.tree.flatten(init_shapes(config))
  return jax.tree.unflatten(treedef, [RandomLeaf(x.shape, i) for i, x in enumerate(leaves)])


def _parts(params, prefix=()):
  for key, value in params.items():
    if isinstance(value, dict):
      yield from _parts(value, prefix + (key,))
    else:
      part = np.asarray(value)
      for name in reversed(prefix + (key,)):
        part = {name: part}
      yield {"params": part}


# Runs a script and writes its peak resident set (VmHWM, KiB) at exit. Read in the process
# itself, after exec: a forked child's own ru_maxrss would count the parent's pages it started
# with.
_MEASURE = """
import atexit, os, runpy, sys
def report():
  with open('/proc/self/status') as status, open(os.environ['JAXLM_PEAK_FILE'], 'w') as out:
    out.write(next(l for l in status if l.startswith('VmHWM:')).split()[1])
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_rss_of(script: str, args: list[str], workdir: str) -> int:
  """Peak resident bytes of `python script args...` run to completion."""
  peak_file = os.path.join(workdir, "peak_kib")
  subprocess.run([sys.executable, "-c", _MEASURE, script, *args], check=True,
                 stdout=subprocess.DEVNULL, env={**os.environ, "JAXLM_PEAK_FILE": peak_file})
  with open(peak_file, encoding="utf-8") as f:
    return int(f.read()) * 1024


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_gin", default="gin/models/1b.gin")
  parser.add_argument("--max_shard_bytes", type=int, default=2 << 30)
  parser.add_argument("--workdir", default="/tmp/jaxlm_bench_convert")
  args = parser.parse_args(argv)
  gin_config.parse([args.model_gin], [])
  config = ModelConfig()
  shutil.rmtree(args.workdir, ignore_errors=True)
  hf_dir, run_dir = (os.path.join(args.workdir, n) for n in ("hf", "run"))
  params = random_params(config)
  export_hf(params, config, hf_dir, max_shard_bytes=args.max_shard_bytes)
  # A run of this model: its params, and the record load_saved_run rebuilds the stage from.
  checkpointer = Checkpointer(run_dir)
  checkpointer.save_in_parts(0, _parts(params), {
      "gin_config": gin_model_text(config) + "run.stages = [@Stage()]\n", "stage_index": 0})
  checkpointer.close()

  shard = max(os.path.getsize(os.path.join(hf_dir, n))
              for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  tensor = 4 * max(leaf.size for leaf in jax.tree.leaves(init_shapes(config)))
  goal = 1.3 * (shard + tensor)
  idle = os.path.join(args.workdir, "idle.py")
  with open(idle, "w", encoding="utf-8") as f:
    f.write("import jax, jaxlm.training.saved_run, jaxlm.interop\njax.devices()\n")
  floor = peak_rss_of(idle, [], args.workdir)
  rows = [("hf_to_jaxlm", peak_rss_of(CONVERT, ["hf_to_jaxlm", hf_dir,
                                                os.path.join(args.workdir, "imported")],
                                      args.workdir)),
          ("jaxlm_to_hf", peak_rss_of(CONVERT, ["jaxlm_to_hf", run_dir,
                                                os.path.join(args.workdir, "exported"),
                                                "--max_shard_bytes", str(args.max_shard_bytes)],
                                      args.workdir))]
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  print(f"{count_params(init_shapes(config)):,} params "
        f"({args.model_gin}), float32, largest shard {gib(shard)}, largest tensor {gib(tensor)}; "
        f"{datetime.date.today()}, {os.cpu_count()} CPUs\n")
  print("| direction | peak RSS | peak / goal | above the idle interpreter |")
  print("|---|---|---|---|")
  for name, peak in rows:
    print(f"| {name} | {gib(peak)} | {peak / goal:.2f} | {gib(peak - floor)} |")
  print(f"\ngoal 1.3 x (shard + tensor) = {gib(goal)}; an idle interpreter with jax and jaxlm "
        f"imported peaks at {gib(floor)}")
  shutil.rmtree(args.workdir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
