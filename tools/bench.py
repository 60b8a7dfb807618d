"""Training throughput of the real jaxlm train step, side by side with PyTorch (issue 7).

    python tools/bench.py --configs=bench-tiny,bench-small --dtypes=float32,bfloat16 \
        --steps=20 --repeats=3 --json=/tmp/bench.json

For each named config and dtype this measures, after compilation and warm-up, the train-step
time (median and min-max over --steps steps, each timed to completion), tokens/s, model FLOPs
per token (6·N + 12·layers·heads·head_dim·seq, see jaxlm/model/flops.py), achieved FLOP/s and MFU
against the *measured* peak of this device: the best jitted square matmul in the compute dtype,
measured before and after the rows of the same invocation. It also reports compile time (lower +
compile) and peak memory: the process's peak resident set (VmHWM) over the timed steps, above
what it held before the model was built, with freed compiler memory handed back and the peak
reset first, so jaxlm and PyTorch are measured the same way (XLA's own plan, arguments +
temporaries, goes to the JSON as `xla_plan_bytes`).

`--impls=torch` runs the same architecture and batch as Hugging Face `LlamaForCausalLM` (eager,
SDPA attention, random init, no download) with `torch.optim.AdamW`: the same learning rate,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, and global-norm clipping at 1.0
as jaxlm's `adamw`. bfloat16 means mixed precision on both sides: float32 parameters and
optimizer state, bfloat16 matmuls (ModelConfig.dtype / torch.autocast). Install the torch side
with `pip install -e ".[bench]"`.

--repeats=N runs every row N times, interleaved, and gives the jaxlm / torch ratio and jaxlm's MFU
as the median over the N invocations with their min-max: on a shared machine the spread between
invocations is larger than within one. The first line names the host's CPU and its vector
extensions (AVX2 and AVX-512 hosts rank the two frameworks differently).

Every (config, dtype, impl) runs in a fresh worker process, so one measurement's peak memory,
thread pools and allocator never leak into another's; set XLA_FLAGS in the environment to try
XLA:CPU options on the jaxlm side.
"""

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from jaxlm.training import host_memory
from jaxlm.benchmarking import (ADAMW, CONFIGS, LEARNING_RATE, BenchConfig, benchmark_stage,
                                compiled_train_step, random_batch)

class PeakMemory:
  """Peak resident set of this process over the timed steps, above what it held before the
  model was built. Linux lets the peak (VmHWM) be reset after compilation and warm-up, so
  compiler memory is not counted; elsewhere it falls back to the lifetime peak (ru_maxrss)."""

  def __init__(self):
    self.baseline = self._status_bytes("VmRSS")
    self.method = "VmHWM after reset" if self.baseline is not None else "ru_maxrss"

  @staticmethod
  def _status_bytes(field: str) -> int | None:
    try:
      with open("/proc/self/status", encoding="ascii") as f:
        line = next(l for l in f if l.startswith(field + ":"))
      return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
      return None

  @staticmethod
  def release_free() -> None:
    """Hand freed heap pages (e.g. the compiler's) back to the OS, so the peak counts only
    what training keeps: jemalloc's purge when it is preloaded, else glibc's malloc_trim."""
    try:
      libc = ctypes.CDLL(None)
    except OSError:
      return
    if hasattr(libc, "mallctl"):
      libc.mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: every arena.
    elif hasattr(libc, "malloc_trim"):
      libc.malloc_trim(0)

  def reset(self) -> None:
    if self.method == "VmHWM after reset":
      try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
          f.write("5")  # Resets VmHWM to the current RSS (Linux >= 4.0).
      except OSError:
        self.method = "VmHWM (not resettable)"

  def peak_bytes(self) -> int:
    peak = self._status_bytes("VmHWM")
    if peak is None:
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.
    return peak - (self.baseline or 0)


def _timed_steps(step, steps: int, warmup: int, memory: PeakMemory | None = None,
                 cpu_times: list[float] | None = None) -> list[float]:
  """Seconds per step; `step()` must return only once the step's work is done. `cpu_times`, if
  given, gets each step's CPU seconds (all threads): steadier than wall time on a busy machine."""
  if memory:
    memory.release_free()
  for _ in range(warmup):
    step()
  if memory:
    memory.reset()
  times = []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    times.append(time.perf_counter() - start)
    if cpu_times is not None:
      cpu_times.append(time.process_time() - cpu_start)
  return times


def run_jaxlm(bench: BenchConfig, dtype: str, steps: int, warmup: int, **model_overrides) -> dict:
  """Time jaxlm's own train step (train_step.make_train_step, as the trainer builds it) on a
  one-device mesh, the batch already on the device."""
  import jax  # pylint: disable=import-outside-toplevel

  memory = PeakMemory()
  stage = benchmark_stage(bench, dtype, steps + warmup,
                          model=bench.model_config(dtype, **model_overrides))
  step, compile_s, train_step = compiled_train_step(stage, random_batch(bench))
  first_loss = float(step()["train/loss"])
  cpu_times = []
  times = _timed_steps(step, steps, max(warmup - 1, 0), memory, cpu_times)
  peak_bytes = memory.peak_bytes()
  last_loss = float(step()["train/loss"])
  plan = train_step.memory_analysis()
  plan = None if plan is None else plan.argument_size_in_bytes + plan.temp_size_in_bytes
  return {"step_times_s": times, "step_cpu_s": cpu_times, "compile_s": compile_s,
          "first_loss": first_loss,
          "last_loss": last_loss, "peak_mem_bytes": peak_bytes, "peak_mem_method": memory.method,
          "xla_plan_bytes": plan,
          "cpu_async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}


def run_torch(bench: BenchConfig, dtype: str, steps: int, warmup: int) -> dict:
  """Time a Hugging Face LlamaForCausalLM train step with torch.optim.AdamW, same shapes."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from transformers import (  # pylint: disable=import-outside-toplevel
      LlamaConfig, LlamaForCausalLM)

  torch.manual_seed(0)
  memory = PeakMemory()
  config = LlamaConfig(
      vocab_size=bench.vocab_size, hidden_size=bench.d_model, intermediate_size=bench.mlp_dim,
      num_hidden_layers=bench.num_layers, num_attention_heads=bench.num_heads,
      num_key_value_heads=bench.num_heads, max_position_embeddings=bench.seq_len,
      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False,
      initializer_range=0.02)
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  model = LlamaForCausalLM(config).train()
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": ADAMW["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  # fused=True: the fastest AdamW torch has on CPU (one kernel per tensor, no foreach lists).
  optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(ADAMW["b1"], ADAMW["b2"]),
                                eps=ADAMW["eps"], fused=True)
  batch = {k: torch.from_numpy(v) for k, v in random_batch(bench).items()}
  inputs, targets = batch["inputs"].long(), batch["targets"].long()
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    with autocast:
      logits_BLV = model(input_ids=inputs, position_ids=batch["positions"].long()).logits
    loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, ADAMW["grad_clip_norm"])
    optimizer.step()
    return loss

  start = time.perf_counter()
  first_loss = step().item()
  first_step_s = time.perf_counter() - start
  times = _timed_steps(step, steps, max(warmup - 1, 0), memory)
  peak_bytes = memory.peak_bytes()
  last_loss = step().item()
  return {"step_times_s": times, "compile_s": None, "first_step_s": first_step_s,
          "first_loss": first_loss, "last_loss": last_loss, "peak_mem_bytes": peak_bytes,
          "peak_mem_method": memory.method, "xla_plan_bytes": None,
          "num_params": sum(p.numel() for p in params), "torch": torch.__version__,
          "threads": torch.get_num_threads()}


def measure_peaks(dtype: str, sizes: list[int]) -> dict:
  """The device's matmul peak in `dtype` as XLA reaches it (the MFU denominator): the best
  square matmul over `sizes`; and as PyTorch reaches it, when installed (for reference)."""
  from jaxlm.model import flops  # pylint: disable=import-outside-toplevel
  xla = {n: flops.measure_peak_flops(dtype, size=n, repeats=10) for n in sizes}
  peaks = {"xla": max(xla.values()), "xla_by_size": xla}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return peaks
  best = 0.0
  for n in sizes:
    a = torch.ones(n, n, dtype=getattr(torch, dtype))
    best = max(best, 2 * n**3 / min(_timed_steps(lambda: a @ a, 10, 1)))  # pylint: disable=cell-var-from-loop
  peaks["torch"] = best
  return peaks


WORKERS = {"jaxlm": run_jaxlm, "torch": run_torch}

# XLA:CPU allocates its temporaries afresh every step; glibc's defaults hand buffers this large
# back to the kernel on free, so each step page-faults (and zero-fills) gigabytes again: 1.6M
# minor faults and ~3 s of system time per bench-small step. 'keep' is what `python -m
# jaxlm.train` sets up by itself (jaxlm/training/host_memory.py: glibc mallopt that keeps freed memory,
# and CPU steps run one at a time so what is kept stays one step's worth); 'keep-async' is the
# same mallopt with JAX's asynchronous CPU dispatch left on (the trainer's setting before issue
# 11: consecutive steps' temporaries overlap and the heap grows); 'jemalloc' preloads jemalloc
# with decay off. Each is applied to both sides alike (PyTorch's CPU allocator is malloc too);
# 'system' is glibc untouched.
ALLOCATORS = {"keep": None, "keep-async": None, "system": None, "jemalloc": "libjemalloc.so.2"}
ALLOCATOR_ENV = {"jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")


def allocator_env(name: str) -> dict:
  """Environment that makes a worker process use allocator `name`."""
  if name in ("keep", "keep-async"):
    return {"JAXLM_BENCH_KEEP_FREED_MEMORY": name}  # Read by the worker: set up in-process.
  library = ALLOCATORS[name]
  if library is None:
    return {}
  found = [os.path.join(d, library) for d in LIBRARY_DIRS if os.path.exists(os.path.join(d, library))]
  if not found:
    raise SystemExit(f"bench: error: --allocator={name} needs {library} (Debian/Ubuntu: apt-get "
                     "install libjemalloc2), or use --allocator=keep")
  return {"LD_PRELOAD": found[0], **ALLOCATOR_ENV.get(name, {})}


def _run_worker(kind: str, env: dict | None = None, **spec) -> dict:
  """Run one measurement in a fresh Python process; returns its result dict."""
  command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}",
             f"--worker_spec={json.dumps(spec)}"]
  done = subprocess.run(command, capture_output=True, text=True, check=False,
                        env={**os.environ, **(env or {})})
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  if done.returncode or not lines:
    raise RuntimeError(f"{kind} worker {spec} failed:\n{done.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _worker_main(kind: str, spec: dict) -> None:
  keep = os.environ.get("JAXLM_BENCH_KEEP_FREED_MEMORY")
  if keep and not host_memory.keep_freed_memory(one_step_at_a_time=keep == "keep"):
    raise SystemExit(f"bench: error: --allocator={keep} needs glibc malloc; use "
                     "--allocator=system")
  if kind == "peak":
    result = measure_peaks(spec["dtype"], spec["sizes"])
  else:
    bench = CONFIGS[spec.pop("config")]
    result = WORKERS[kind](bench, **spec)
  print("RESULT " + json.dumps(result), flush=True)


def summarise(name: str, impl: str, dtype: str, raw: dict, peak_flops: float) -> dict:
  from jaxlm.model import flops  # pylint: disable=import-outside-toplevel
  bench = CONFIGS[name]
  times = raw["step_times_s"]
  step_s = statistics.median(times)
  flops_per_token = flops.flops_per_token(bench.model_config(dtype), bench.seq_len)
  achieved = flops_per_token * bench.tokens_per_step / step_s
  return {"config": name, "impl": impl, "dtype": dtype, "steps": len(times),
          "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3,
          "step_ms_max": max(times) * 1e3, "tokens_per_s": bench.tokens_per_step / step_s,
          "flops_per_token": flops_per_token, "achieved_flops": achieved,
          "peak_flops": peak_flops, "mfu": achieved / peak_flops,
          "peak_mem_mib": raw["peak_mem_bytes"] / 2**20, **raw}


HEADER = (f"{'config':<12} {'impl':<6} {'dtype':<8} {'step ms (min-max)':>24} {'tokens/s':>9} "
          f"{'MFLOP/tok':>9} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9} {'peak MiB':>8}")


def format_row(row: dict) -> str:
  spread = f"{row['step_ms']:.1f} ({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f})"
  compile_s = "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
  return (f"{row['config']:<12} {row['impl']:<6} {row['dtype']:<8} {spread:>24} "
          f"{row['tokens_per_s']:>9,.0f} {row['flops_per_token'] / 1e6:>9.1f} "
          f"{row['achieved_flops'] / 1e12:>8.3f} {row['mfu']:>6.1%} {compile_s:>9} "
          f"{row['peak_mem_mib']:>8,.0f}")


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def host_cpu() -> str:
  """The host's CPU model and the vector extensions that decide XLA's and PyTorch's kernels
  (AVX2 hosts and AVX-512 hosts rank the two frameworks differently), from /proc/cpuinfo."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() in ("flags", "Features"):
          flags = set(value.split())
          break
  except OSError:
    pass
  return f"{model}, {platform.machine()}, ISA: {' '.join(f for f in ISA_FLAGS if f in flags) or '?'}"


def ratio_summary(rows: list[dict]) -> list[str]:
  """jaxlm / torch throughput per config and dtype: the median over invocations (each pairs one
  jaxlm and one torch worker run back to back) with the min-max, and jaxlm's MFU alike."""
  lines = []
  for key in dict.fromkeys((r["config"], r["dtype"]) for r in rows):
    by_repeat = {}
    for r in rows:
      if (r["config"], r["dtype"]) == key:
        by_repeat.setdefault(r["repeat"], {})[r["impl"]] = r
    ratios = [p["jaxlm"]["tokens_per_s"] / p["torch"]["tokens_per_s"]
              for p in by_repeat.values() if {"jaxlm", "torch"} <= set(p)]
    mfus = [p["jaxlm"]["mfu"] for p in by_repeat.values() if "jaxlm" in p]
    parts = []
    if ratios:
      parts.append(f"jaxlm / torch throughput = {statistics.median(ratios):.2f}x "
                   f"({min(ratios):.2f}-{max(ratios):.2f}, n={len(ratios)})")
    if mfus:
      parts.append(f"jaxlm MFU {statistics.median(mfus):.1%} "
                   f"({min(mfus):.1%}-{max(mfus):.1%}, n={len(mfus)})")
    if parts:
      lines.append(f"{key[0]} {key[1]}: " + "; ".join(parts))
  return lines


def _csv(text: str) -> list[str]:
  return [item for item in text.split(",") if item]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", type=_csv, default=["bench-tiny", "bench-small"])
  parser.add_argument("--dtypes", type=_csv, default=["float32"])
  parser.add_argument("--impls", type=_csv, default=["jaxlm", "torch"])
  parser.add_argument("--steps", type=int, default=30, help="timed steps (>= 20 for a result)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="invocations of every row, interleaved (>= 3 for a result: this "
                           "machine's noise between invocations exceeds that within one)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  parser.add_argument("--peak_sizes", type=lambda t: [int(n) for n in _csv(t)],
                      default=[1024, 2048, 4096], help="sides of the square peak matmuls")
  parser.add_argument("--allocator", choices=sorted(ALLOCATORS), default="keep",
                      help="malloc for every worker, both sides (see ALLOCATORS); keep is what "
                           "the trainer sets up")
  parser.add_argument("--json", help="write every row (with all step times) to this file")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker_main(args.worker, json.loads(args.worker_spec))
    return 0
  unknown = sorted(set(args.configs) - set(CONFIGS)) + sorted(set(args.impls) - set(WORKERS))
  if unknown:
    print(f"bench: unknown config or impl {unknown[0]!r}; configs: {sorted(CONFIGS)}, impls: "
          f"{sorted(WORKERS)}", file=sys.stderr)
    return 2
  if "torch" in args.impls and not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
    print("bench: error: --impls=torch needs torch and transformers; pip install -e '.[bench]' "
          "(or --impls=jaxlm)", file=sys.stderr)
    return 2
  if args.repeats < 1:
    print(f"bench: error: --repeats={args.repeats}; give 1 or more (3 or more for a result)",
          file=sys.stderr)
    return 2
  if args.steps < 20:
    print(f"bench: note: {args.steps} timed steps is a smoke test; use >= 20 for a result",
          file=sys.stderr)

  import jax  # pylint: disable=import-outside-toplevel
  env = allocator_env(args.allocator)
  device = jax.devices()[0]
  host = host_cpu()
  print(f"host: {host}")
  print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, "
        f"allocator {args.allocator}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}")
  # The peak is measured before and after the rows and the better kept: other jobs on a shared
  # machine only ever slow a measurement down. Rows print once the peak is known.
  measure = lambda: {d: _run_worker("peak", env, dtype=d, sizes=args.peak_sizes)
                     for d in args.dtypes}
  peaks, raws = measure(), []
  for repeat in range(args.repeats):  # Interleaved: slow spells of the machine hit both sides.
    for name in args.configs:
      for dtype in args.dtypes:
        for impl in args.impls:
          raw = _run_worker(impl, env, config=name, dtype=dtype, steps=args.steps,
                            warmup=args.warmup)
          raw["load_avg_1m"] = os.getloadavg()[0]  # Other jobs on the machine skew times.
          raw["repeat"] = repeat
          raws.append((name, dtype, impl, raw))
          print(f"bench: {name} {impl} {dtype} (invocation {repeat + 1}/{args.repeats}): "
                f"median step {statistics.median(raw['step_times_s']) * 1e3:.1f} ms",
                file=sys.stderr)
  for dtype, after in measure().items():
    peaks[dtype] = max(peaks[dtype], after, key=lambda p: p["xla"])
  for dtype, peak in peaks.items():
    extra = f", torch {peak['torch'] / 1e12:.3f}" if "torch" in peak else ""
    print(f"matmul peak ({dtype}, best of sizes {args.peak_sizes}, before and after the rows): "
          f"XLA {peak['xla'] / 1e12:.3f} TFLOP/s{extra}; MFU is against XLA's")
  print(HEADER)
  rows = [summarise(name, impl, dtype, raw, peaks[dtype]["xla"])
          for name, dtype, impl, raw in raws]
  for row in rows:
    print(format_row(row))
  for line in ratio_summary(rows):
    print(line)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": f"{device.platform} ({device.device_kind})", "cpus": os.cpu_count(),
                 "host": host, "repeats": args.repeats,
                 "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv,
                 "allocator": args.allocator, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "peaks": peaks, "rows": rows},
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
