"""Transformer building blocks: embedding, RMSNorm, rotary embedding, SwiGLU MLP.

Every parameter carries logical axis names through `nn.with_logical_partitioning`; a rule set
(jaxlm/parallel.py) maps them onto mesh axes. Nothing here names a mesh axis.
"""

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.config import ModelConfig
from jaxlm.model.sparse_plus_low_rank import SLTrainMatrix, SparsePlusLowRank


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def matrix_param(module: nn.Module, name: str, init, shape, axes):
  """A block's matrix `name` (declared in the module's PARTS, its input axes first): the dense
  param, or with ModelConfig.parameterization = "sltrain" or "low_rank" its factors
  (jaxlm/model/sparse_plus_low_rank.py). Multiply by it with `matmul`."""
  cfg, role = module.config, module.PARTS[name]
  if cfg.parameterization == "dense" or not role.prunable or role.routed:
    return param_with_axes(module, name, init, shape, axes, cfg.param_dtype)
  if tuple(axes[:len(role.reads)]) != role.reads:
    raise ValueError(f"{name}'s axes {axes} do not start with the axes it reads {role.reads}")
  return SparsePlusLowRank(cfg, tuple(shape), tuple(axes), len(role.reads), name=name)()


def matmul(spec: str, x, weight):
  """jnp.einsum(spec, x, weight) in x's dtype, for a dense weight or an SLTrain one."""
  if isinstance(weight, SLTrainMatrix):
    return weight.einsum(spec, x)
  return jnp.einsum(spec, x, weight.astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class Role:
  """What one param of a module is, for the code that transforms params without knowing their
  keys (growth, sparsity, FLOPs, interop; jaxlm/model/anatomy.py). Every module that owns params
  declares a `PARTS = {param key: Role}`."""
  kind: str  # "embedding", "head", "norm", "attention.query", ..., "mlp.up", "mlp.gate", "mlp.down"
  # The logical axes contracted with the incoming activation (the weight's input side); every
  # other axis indexes the activation it writes.
  reads: tuple[str, ...] = ()
  matmul: bool = True  # Multiplies every token's activation: counted in FLOPs, sparsified.
  prunable: bool = True  # A matmul that sparsity methods mask by default (an MoE router is not).
  # An MoE expert weight [expert, ...]: each token multiplies experts_per_token of its experts.
  routed: bool = False


class Embed(nn.Module):
  """Token embedding; with tied embeddings the Decoder also uses the table as the output head."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"embedding": Role("embedding", reads=("vocab",), matmul=False)}

  def setup(self):
    cfg = self.config
    self.embedding_VD = param_with_axes(
        self, "embedding", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
        ("vocab", "embed"), cfg.param_dtype)

  def __call__(self, tokens_BL):
    # Gather from the whole table (FSDP all-gathers it, as it does every weight at use): a
    # gather from a sharded table makes XLA's partitioner replicate it anyway, with a warning.
    table_VD = nn.with_logical_constraint(self.embedding_VD, (None, None))
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(self.config.compute_dtype)
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019, 1910.07467); statistics in float32."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"scale": Role("norm", reads=("embed",), matmul=False)}

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    scale_D = param_with_axes(self, "scale", nn.initializers.ones, (cfg.d_model,), ("embed",),
                              cfg.param_dtype)
    x32 = x_BLD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (x32 * scale_D).astype(cfg.compute_dtype)


def llama3_inv_freq(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_len: int) -> np.ndarray:
  """Llama 3.1's rotary scaling, as transformers' `_compute_llama3_parameters` computes it (in
  float32): wavelengths shorter than original_max_len / high_freq_factor are kept, longer than
  original_max_len / low_freq_factor divided by `factor`, and those between interpolated."""
  inv_freq = np.asarray(inv_freq, np.float32)
  low_freq_wavelen = original_max_len / low_freq_factor
  high_freq_wavelen = original_max_len / high_freq_factor
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
  smooth = ((np.float32(original_max_len) / wavelen - np.float32(low_freq_factor))
            / np.float32(high_freq_factor - low_freq_factor))
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


@functools.lru_cache(maxsize=16)
def rope_tables(max_len: int, head_dim: int, theta: float,
                scaling: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
  """sin and cos of every position's rotary angles, [max_len, head_dim / 2] float32 constants.

  Looked up, not computed in the step: fused into their consumers, jnp.sin/cos were evaluated
  again for every head and every use, forward and backward (~10% of a bench-small step on CPU).
  The angles are float32 products as Hugging Face Llama forms them. `scaling`: None, or
  ("llama3", factor, low_freq_factor, high_freq_factor, original_max_len)
  (ModelConfig.rope_scaling_params)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if scaling is not None:
    kind, *args = scaling
    if kind != "llama3":
      raise ValueError(f"unknown rope scaling {kind!r}")
    inv_freq = llama3_inv_freq(inv_freq, *args)
  angles = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
  return np.sin(angles), np.cos(angles)


def apply_rope(x_BLHK, positions_BL, theta: float, max_len: int, scaling: tuple | None = None):
  """Rotary position embedding (Su et al. 2021, 2104.09864), half-split ("rotate_half") layout.

  The half-split layout is the one Hugging Face Llama checkpoints use, so weights map 1:1.
  Positions must be below `max_len` (ModelConfig.max_seq_len).
  """
  sin_table, cos_table = rope_tables(max_len, x_BLHK.shape[-1], theta, scaling)
  sin = jnp.take(sin_table, positions_BL, axis=0, mode="clip")[:, :, None, :]
  cos = jnp.take(cos_table, positions_BL, axis=0, mode="clip")[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLHK.dtype)


@jax.custom_vjp
def swiglu(gate_up_BL2F):
  """silu(gate) * up from the stacked [..., 2, F] projection. Its own VJP writes the stacked
  gradient in one pass; autodiff of the two slices would pad each and add them (~8% of a
  bench-tiny step on CPU)."""
  gate, up = gate_up_BL2F[..., 0, :], gate_up_BL2F[..., 1, :]
  return nn.silu(gate) * up


def _swiglu_forward(gate_up_BL2F):
  return swiglu(gate_up_BL2F), gate_up_BL2F


def _swiglu_backward(gate_up_BL2F, dh_BLF):
  gate, up = gate_up_BL2F[..., 0, :], gate_up_BL2F[..., 1, :]
  sigmoid = jax.nn.sigmoid(gate)
  dgate = dh_BLF * up * sigmoid * (1 + gate * (1 - sigmoid))  # d silu(x) = σ(x)(1 + x(1 - σ(x))).
  return (jnp.stack([dgate, dh_BLF * gate * sigmoid], axis=-2),)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class SwiGLU(nn.Module):
  """Gated MLP with SiLU (Shazeer 2020, 2002.05202): down(silu(x W_gate) * (x W_up))."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"gate": Role("mlp.gate", reads=("embed",)),
                           "up": Role("mlp.up", reads=("embed",)),
                           "down": Role("mlp.down", reads=("mlp",))}

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    shape_in, shape_out = (cfg.d_model, cfg.mlp_dim), (cfg.mlp_dim, cfg.d_model)
    w_gate = matrix_param(self, "gate", init, shape_in, ("embed", "mlp"))
    w_up = matrix_param(self, "up", init, shape_in, ("embed", "mlp"))
    w_down = matrix_param(self, "down", out_init, shape_out, ("mlp", "embed"))
    if isinstance(w_gate, SLTrainMatrix):  # Each formed inside its own matmul, not stacked.
      h_BLF = nn.silu(matmul("bld,df->blf", x_BLD, w_gate)) * matmul("bld,df->blf", x_BLD, w_up)
    else:
      # One [D, 2, F] matmul instead of two [D, F] ones: a larger, more efficient GEMM on CPU
      # (~4% of a bench-small step). The params stay two arrays; only this step stacks them.
      w_gate_up_D2F = jnp.stack([w_gate, w_up], axis=1).astype(cfg.compute_dtype)
      h_BLF = swiglu(jnp.einsum("bld,dtf->bltf", x_BLD, w_gate_up_D2F))
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
    self.sow("activations", "mlp", h_BLF)  # The hidden units (see Attention's "heads").
    return matmul("blf,fd->bld", h_BLF, w_down)


# A block's MLP is chosen by ModelConfig.mlp among these: a module taking (config) and mapping
# x_BLD -> y_BLD, with a PARTS table whose matrices carry the logical axes "embed" and "mlp",
# sowing its hidden units [B, L, F] as ("activations", "mlp") for subcloning.
MLP_KINDS: dict[str, type] = {"swiglu": SwiGLU}


def register_mlp(name: str, module: type) -> None:
  """Make `ModelConfig.mlp = name` build `module` in every block (a new architecture in a test or
  an experiment; the MoE layer)."""
  if not isinstance(getattr(module, "PARTS", None), dict):
    raise TypeError(f"MLP {module.__name__} declares no PARTS = {{param key: Role}}")
  MLP_KINDS[name] = module


def mlp_kind(config: ModelConfig) -> type:
  try:
    return MLP_KINDS[config.mlp]
  except KeyError:
    raise UserError(f"ModelConfig.mlp={config.mlp!r} is not an MLP jaxlm knows; choose one of "
                    f"{sorted(MLP_KINDS)} (or register one with jaxlm.model.layers.register_mlp)"
                    ) from None
