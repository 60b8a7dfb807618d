"""What the benchmark tools share (tools/bench.py, bench_sparsity.py, bench_attention.py,
accelerator_check.py): the benchmark models, the random batch they train on, the optimizer
settings both jaxlm and PyTorch use, the trainer's step compiled on one device, and attention
timed forward and backward."""

import dataclasses
import statistics
import time

import numpy as np

LEARNING_RATE = 3e-4  # Constant: a schedule costs the same on both sides and would only add noise.
ADAMW = {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip_norm": 1.0}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """A model shape and a batch. Llama blocks, multi-head attention, untied embeddings."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  seq_len: int
  batch_size: int

  @property
  def tokens_per_step(self) -> int:
    return self.seq_len * self.batch_size

  def model_config(self, dtype: str, **overrides):
    from jaxlm.model import ModelConfig  # pylint: disable=import-outside-toplevel
    return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model,
                       num_layers=self.num_layers, num_heads=self.num_heads,
                       num_kv_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       max_seq_len=self.seq_len, tie_embeddings=False, dtype=dtype, **overrides)


CONFIGS = {
    "bench-tiny": BenchConfig(vocab_size=256, d_model=256, num_layers=4, num_heads=4,
                              mlp_dim=704, seq_len=256, batch_size=16),
    "bench-small": BenchConfig(vocab_size=32000, d_model=512, num_layers=8, num_heads=8,
                               mlp_dim=1408, seq_len=512, batch_size=8),
}


def worker_result(script: str, flags: list[str]) -> dict:
  """Runs `python script *flags` (a benchmark measuring in a fresh process, so no measurement's
  memory, thread pools or compiled programs leak into the next) and returns the JSON it printed
  on its last "RESULT " line; RuntimeError with the end of its stderr if it printed none."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  done = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True,
                        check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
  if done.returncode or not lines:
    raise RuntimeError(done.stderr[-2000:])
  return json.loads(lines[-1][len("RESULT "):])


def worker_rows(tool: str, script: str, names: list[str], flags: list[str]) -> dict | None:
  """{name: worker_result(script, --worker=name + flags)} for each name, in order; None (after
  one line on stderr saying which failed, and why) if one fails."""
  import sys  # pylint: disable=import-outside-toplevel
  rows = {}
  for name in names:
    try:
      rows[name] = worker_result(script, [f"--worker={name}", *flags])
    except RuntimeError as e:
      print(f"{tool}: {name} failed:\n{e}", file=sys.stderr)
      return None
  return rows


def random_batch(bench: BenchConfig, seed: int = 0) -> dict:
  """One packed-batch-shaped example of uniform random tokens (one document per row)."""
  rng = np.random.default_rng(seed)
  shape = (bench.batch_size, bench.seq_len)
  return {
      "inputs": rng.integers(0, bench.vocab_size, shape, dtype=np.int32),
      "targets": rng.integers(0, bench.vocab_size, shape, dtype=np.int32),
      "positions": np.broadcast_to(np.arange(bench.seq_len, dtype=np.int32), shape).copy(),
      "segment_ids": np.ones(shape, np.int32),
      "weights": np.ones(shape, np.float32),
  }


def benchmark_stage(bench: BenchConfig, dtype: str, num_steps: int, model=None, **fields):
  """The stage every benchmark trains: `bench`'s model in `dtype` (or `model`), a constant
  learning rate and jaxlm's adamw with ADAMW's settings (`fields`: other Stage fields)."""
  import optax  # pylint: disable=import-outside-toplevel
  from jaxlm.optim.optimizers import adamw  # pylint: disable=import-outside-toplevel
  from jaxlm.training.stages import Stage  # pylint: disable=import-outside-toplevel
  return Stage(num_steps=num_steps, model=model or bench.model_config(dtype),
               schedule=lambda _: optax.constant_schedule(LEARNING_RATE),
               optimizer=lambda schedule: adamw(schedule, **ADAMW), **fields)


def compiled_train_step(stage, batch: dict, seed: int = 0):
  """The trainer's own jitted step (train_step.make_train_step) for `stage` on a one-device mesh,
  compiled, its state initialised and `batch` placed on the device. Returns (step, compile
  seconds, the compiled executable); `step()` runs one update to completion, returns metrics."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlm import parallel  # pylint: disable=import-outside-toplevel
  from jaxlm.training.train_step import (  # pylint: disable=import-outside-toplevel
      make_train_step, sharded_init, state_shardings)
  mesh_config = parallel.MeshConfig(data=1, fsdp=1, tensor=1)
  mesh, rules = parallel.make_mesh(mesh_config, jax.devices()[:1]), mesh_config.resolved_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(stage, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(seed))
    batch = parallel.global_batch(batch, batch_sharding)
    start = time.perf_counter()
    compiled = make_train_step(stage, shardings, batch_sharding).lower(state, batch).compile()
    compile_s = time.perf_counter() - start

  def step():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return metrics
  return step, compile_s, compiled


def attention_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> float:
  """Forward FLOPs as FlashAttention-2 counts them (2307.08691, section 4): 4·B·H·L²·D, halved
  when causal (the masked half is skipped); forward+backward is 3.5 times this."""
  return 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)


def time_compiled(fn, args, iters: int) -> tuple[float, float]:
  """(median seconds per call of jit(fn)(*args) after a warm-up call, XLA's planned scratch
  bytes)."""
  import jax  # pylint: disable=import-outside-toplevel
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  scratch = float(getattr(memory, "temp_size_in_bytes", float("nan"))) if memory else float("nan")
  jax.block_until_ready(compiled(*args))  # Warm-up (allocation, autotuning).
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), scratch


def attention_inputs(batch, length, heads, kv_heads, head_dim, dtype, doc_len, seed=0):
  """Random q, k, v, an output cotangent, and segment ids of packed documents of `doc_len`
  tokens (the last one cut short)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], q.shape, dtype)
  ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) // doc_len + 1, (batch, length))
  return q, k, v, do, ids


def attention_fwd_and_grad(impl: str, ids, do, causal: bool = True):
  """(forward(q, k, v), forward+backward(q, k, v) -> dq, dk, dv) of an ATTENTION_IMPLS entry."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlm.model.attention import ATTENTION_IMPLS  # pylint: disable=import-outside-toplevel
  attention = ATTENTION_IMPLS[impl]

  def fwd(q, k, v):
    return attention(q, k, v, ids, causal=causal)

  def fwd_bwd(q, k, v):
    out, pullback = jax.vjp(fwd, q, k, v)
    return pullback(do.astype(out.dtype))
  return fwd, fwd_bwd


def time_attention(impl, batch, length, heads, kv_heads, head_dim, dtype, causal, doc_len,
                   iters):
  """((forward seconds, scratch bytes), (forward+backward seconds, scratch bytes))."""
  q, k, v, do, ids = attention_inputs(batch, length, heads, kv_heads, head_dim, dtype, doc_len)
  fwd, fwd_bwd = attention_fwd_and_grad(impl, ids, do, causal)
  return time_compiled(fwd, (q, k, v), iters), time_compiled(fwd_bwd, (q, k, v), iters)
