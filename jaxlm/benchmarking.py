"""What the benchmark tools share (tools/bench.py, bench_sparsity.py): the benchmark models, the
random batch they train on, and the optimizer settings both jaxlm and PyTorch use."""

import dataclasses

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
