"""Model FLOPs per token and model FLOPs utilisation (MFU).

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, 2204.02311, appendix B):

    flops_per_token = 6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

N counts the parameters that take part in matmuls: every weight matrix of the blocks (of an MoE
layer's experts, the k a token is routed to) plus the output head (the input embedding is a lookup, not a matmul; with tied embeddings the table is
counted once, as the head). Norm gains are left out. 6 = 2 (multiply-add) x 3 (forward +
backward w.r.t. activations + backward w.r.t. weights). The attention term counts QKᵀ and AV for
all L x L pairs, as PaLM does (a causal kernel does about half of that work, so MFU is
conventionally reported this way). Recomputation from remat is not counted: MFU is *model*
FLOPs, not hardware FLOPs.
"""

import time

import jax
import jax.numpy as jnp

from jaxlm.model import ModelConfig
from jaxlm.model.anatomy import anatomy


def matmul_params(cfg: ModelConfig) -> int:
  """Weights each token is multiplied by: the blocks' matrices and the output head, as the
  model's anatomy lists them (whatever its MLP). Of an MoE layer's experts, only the
  experts_per_token a token is routed to count (active parameters); its router counts whole."""
  active = lambda part: (part.size * cfg.experts_per_token // cfg.num_experts
                         if part.role.routed else part.size)
  return sum(active(part) for part in anatomy(cfg).matmuls)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
  return 6.0 * matmul_params(cfg) + attention


def measure_peak_flops(dtype="float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device on a large jitted matmul in `dtype`: the practical peak that MFU is
  measured against when the device has no published number (e.g. a CPU)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()  # Compile.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
