"""Sampling throughput with and without the KV cache (jaxlm.generate), on a random-init model.

    python tools/bench_generate.py                              # quickstart model, 512 new tokens
    python tools/bench_generate.py --model_gin=gin/models/small.gin --batches=1,8 --new_tokens=256

For each batch size it generates `new_tokens` greedy tokens after a `prompt_len`-token prompt
(eos never stops a row, so every run does the same work), once with the cache (a prefill, then
one position per token) and once re-running the whole window per token, and prints a markdown
table. Compilation is done ahead of time and not timed; the time is the median of `iters` runs.
"""

import argparse
import datetime
import statistics
import sys
import time

import jax
import numpy as np

from jaxlm.evaluation import decoding
from jaxlm.config import gin_config
from jaxlm.model import ModelConfig, count_params, init_params


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def bench(params, config, batch, prompt_len, new_tokens, use_cache, iters):
  """(median seconds per call, compile seconds)."""
  rng = np.random.default_rng(batch)
  prompts = [[1, *rng.integers(3, config.vocab_size, prompt_len - 1).tolist()]
             for _ in range(batch)]
  decoding.check_lengths(config, prompts, new_tokens)
  prompt_BP, pads_B = decoding.left_pad(prompts, pad_id=0)
  args = (params, prompt_BP, pads_B, jax.random.key(0))
  start = time.perf_counter()
  compiled = decoding._generate.lower(  # pylint: disable=protected-access
      *args, config=config, max_new_tokens=new_tokens, sampling=decoding.Sampling(),
      eos_id=-1, pad_id=0, use_cache=use_cache).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    out = compiled(*args)
    out.block_until_ready()
    times.append(time.perf_counter() - start)
  assert out.shape == (batch, new_tokens)
  return statistics.median(times), compile_seconds


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_gin", default="gin/models/tiny.gin",
                      help="a gin file of ModelConfig bindings")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="e.g. \"ModelConfig.attention_impl = 'xla'\" (repeatable)")
  parser.add_argument("--batches", type=_ints, default=[1, 4])
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=512)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--no_cache_iters", type=int, default=1,
                      help="runs of the (slow) no-cache path per batch size")
  args = parser.parse_args()
  gin_config.parse([args.model_gin], args.gin_bindings)
  config = ModelConfig()
  params = init_params(config, jax.random.key(0))
  device = jax.devices()[0]

  print(f"`{' '.join(['python', *sys.argv])}`, {datetime.date.today().isoformat()}, "
        f"{jax.default_backend()} ({device.device_kind}, {jax.device_count()} device(s)), "
        f"jax {jax.__version__}\n")
  print(f"Model: {args.model_gin} ({count_params(params) / 1e6:.2f}M params, d_model "
        f"{config.d_model}, {config.num_layers} layers, {config.num_heads} heads, "
        f"{config.num_kv_heads} kv heads, {config.dtype}, attention_impl "
        f"{config.attention_impl}); prompt {args.prompt_len} tokens, {args.new_tokens} greedy "
        "new tokens per row.\n")
  print("| batch | KV cache | seconds | new tokens/s | ms per token step | compile s | speed-up |")
  print("|---:|:---|---:|---:|---:|---:|---:|")
  for batch in args.batches:
    rows = {}
    for use_cache in (False, True):
      iters = args.iters if use_cache else args.no_cache_iters
      rows[use_cache] = bench(params, config, batch, args.prompt_len, args.new_tokens,
                              use_cache, iters)
    for use_cache in (False, True):
      seconds, compile_seconds = rows[use_cache]
      speedup = rows[False][0] / seconds
      print(f"| {batch} | {'yes' if use_cache else 'no'} | {seconds:.2f} | "
            f"{batch * args.new_tokens / seconds:,.0f} | {1e3 * seconds / args.new_tokens:.2f} | "
            f"{compile_seconds:.1f} | {speedup:.1f}x |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
