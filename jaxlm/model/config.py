"""ModelConfig: the hyper-parameters of a Llama-style decoder, configured from gin."""

import dataclasses

import gin
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.validation import check_choice, check_field_types, check_range

REMAT_POLICIES = ("none", "full", "dots")
ROPE_SCALINGS = (None, "llama3")
ROUTERS = ("topk_softmax", "softmax_topk")
MOE_DISPATCHES = ("auto", "dropless", "capacity")
MOE_LAYER_PATTERNS = ("all", "every_other")
# How the model runs, not what it computes: a model restored or converted takes these from the
# run (transitions that change the model, such as upcycling, ignore them).
RUN_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "moe_dispatch")
# The fields that mean something only when some block is an MoE layer.
# The fields that mean something only with parameterization = "sltrain".
SLTRAIN_FIELDS = ("sltrain_rank", "sltrain_alpha", "sltrain_density", "sltrain_seed")
PARAMETERIZATIONS = ("dense", "sltrain", "low_rank")  # low_rank: SLTrain without S.
MOE_FIELDS = ("num_experts", "experts_per_token", "expert_mlp_dim", "router", "moe_dispatch",
              "capacity_factor", "load_balancing_weight", "router_z_loss_weight")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, an MLP (SwiGLU).

  `dtype` is the compute dtype; parameters are always stored in float32 (`param_dtype`) so that
  optimizer updates stay exact in mixed precision.
  """
  vocab_size: int = 384
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int | None = None  # None: d_model // num_heads.
  mlp_dim: int = 384
  mlp: str = "swiglu"  # The block's MLP: a name in jaxlm.model.layers.MLP_KINDS.
  max_seq_len: int = 1024
  rope_theta: float = 10_000.0
  # Llama 3.1's frequency-dependent stretch of the rotary wavelengths (transformers'
  # rope_type "llama3"); the four numbers below are its parameters, unused when None.
  rope_scaling: str | None = None
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  attention_bias: bool = False  # Biases on the q/k/v projections (Qwen2), none on the output.
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs, recompute the rest).
  attention_impl: str = "auto"  # See jaxlm.model.attention / jaxlm.kernels.attention_impls.
  # Mixture of experts (jaxlm/model/moe.py): the blocks whose MLP is an MoE layer: () none,
  # "all", "every_other" (blocks 1, 3, 5, ...: Switch / upcycling's choice), or block indices.
  moe_layers: str | tuple = ()
  num_experts: int = 8
  experts_per_token: int = 2  # top-k.
  expert_mlp_dim: int | None = None  # Each expert's hidden units; None: mlp_dim.
  # "topk_softmax": softmax over the k chosen logits (Mixtral; weights sum to 1).
  # "softmax_topk": the k largest of the softmax over all experts (Switch, GShard, T5X).
  router: str = "topk_softmax"
  moe_dispatch: str = "auto"  # "dropless" | "capacity" | "auto" (the faster on this backend).
  capacity_factor: float = 1.25  # Capacity path: slots per expert = ceil(L k / E x this).
  load_balancing_weight: float = 0.01  # x E sum_i f_i P_i (Switch, 2101.03961).
  router_z_loss_weight: float = 1e-3  # x mean logsumexp(logits)^2 (ST-MoE, 2202.08906).
  # How the blocks' attention and MLP matrices are stored: "dense", "sltrain" (2406.02214:
  # W = (alpha / rank) * low-rank product + sparse S on a fixed random support of density
  # `sltrain_density` drawn from `sltrain_seed`; jaxlm/model/sparse_plus_low_rank.py) or
  # "low_rank" (the product alone: SLTrain's low-rank-only baseline). MoE experts and routers,
  # embeddings, norms and the head stay dense.
  parameterization: str = "dense"
  sltrain_rank: int = 128
  sltrain_alpha: float = 32.0
  sltrain_density: float = 0.03
  sltrain_seed: int = 0

  def __post_init__(self):
    check_field_types(self)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                 "max_seq_len"):
      check_range(f"ModelConfig.{name}", getattr(self, name), low=1, integer=True)
    check_range("ModelConfig.head_dim", self.head_dim, low=1, integer=True, optional=True)
    for name in ("rope_theta", "norm_eps", "init_std"):
      check_range(f"ModelConfig.{name}", getattr(self, name), low=0, low_open=True)
    if self.rope_scaling not in ROPE_SCALINGS:
      raise UserError(f"ModelConfig.rope_scaling={self.rope_scaling!r}; choose one of "
                      f"{ROPE_SCALINGS}")
    check_range("ModelConfig.rope_scaling_factor", self.rope_scaling_factor, low=1)
    check_range("ModelConfig.rope_low_freq_factor", self.rope_low_freq_factor, low=0,
                low_open=True)
    check_range("ModelConfig.rope_high_freq_factor", self.rope_high_freq_factor,
                low=self.rope_low_freq_factor, low_open=True)
    check_range("ModelConfig.rope_original_max_len", self.rope_original_max_len, low=1,
                integer=True)
    if self.num_heads % self.num_kv_heads:
      raise UserError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads="
          f"{self.num_kv_heads}; grouped-query attention needs whole groups")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise UserError(
          f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
          "set ModelConfig.head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise UserError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
    self._check_moe()
    self._check_sltrain()
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"ModelConfig.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise UserError(f"ModelConfig.{name}={getattr(self, name)!r} is not a dtype name "
                        "(use 'float32' or 'bfloat16')") from None

  def _check_moe(self) -> None:
    layers = self.moe_layers
    if isinstance(layers, list):  # gin writes a list; the config must stay hashable.
      layers = tuple(layers)
      object.__setattr__(self, "moe_layers", layers)
    if isinstance(layers, str):
      if layers not in MOE_LAYER_PATTERNS:
        raise UserError(f"ModelConfig.moe_layers={layers!r}; choose one of {MOE_LAYER_PATTERNS}, "
                        "() or a tuple of block indices")
    elif not isinstance(layers, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers):
      raise UserError(f"ModelConfig.moe_layers={layers!r}; give 'all', 'every_other', () or a "
                      "tuple of block indices")
    elif any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) < len(layers):
      raise UserError(f"ModelConfig.moe_layers={layers!r} must name distinct blocks in "
                      f"0..{self.num_layers - 1}")
    check_range("ModelConfig.num_experts", self.num_experts, low=1, integer=True)
    check_range("ModelConfig.experts_per_token", self.experts_per_token, low=1,
                high=self.num_experts, integer=True)
    check_range("ModelConfig.expert_mlp_dim", self.expert_mlp_dim, low=1, integer=True,
                optional=True)
    check_range("ModelConfig.capacity_factor", self.capacity_factor, low=0, low_open=True)
    for name in ("load_balancing_weight", "router_z_loss_weight"):
      check_range(f"ModelConfig.{name}", getattr(self, name), low=0)
    check_choice("ModelConfig.router", self.router, ROUTERS)
    check_choice("ModelConfig.moe_dispatch", self.moe_dispatch, MOE_DISPATCHES)
    if not self.moe_blocks:
      defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
      unused = [n for n in MOE_FIELDS if getattr(self, n) != defaults[n]]
      if unused:
        raise UserError(f"ModelConfig.{unused[0]} is set but no block is an MoE layer "
                        f"(moe_layers={self.moe_layers!r}); bind ModelConfig.moe_layers or drop it")

  def _check_sltrain(self) -> None:
    check_choice("ModelConfig.parameterization", self.parameterization, PARAMETERIZATIONS)
    check_range("ModelConfig.sltrain_rank", self.sltrain_rank, low=1, integer=True)
    check_range("ModelConfig.sltrain_alpha", self.sltrain_alpha, low=0, low_open=True)
    check_range("ModelConfig.sltrain_density", self.sltrain_density, low=0, high=1,
                low_open=True, high_open=True)
    check_range("ModelConfig.sltrain_seed", self.sltrain_seed, low=0, integer=True)
    if self.parameterization != "dense":
      smallest = min(self.d_model, self.mlp_dim, self.num_kv_heads * self.resolved_head_dim)
      if self.sltrain_rank > smallest:
        raise UserError(f"ModelConfig.sltrain_rank={self.sltrain_rank} is larger than the "
                        f"smaller side of some block matrix ({smallest}), so the factors would "
                        "hold more than the matrix; lower sltrain_rank")
    unused_fields = {"dense": SLTRAIN_FIELDS, "low_rank": ("sltrain_density", "sltrain_seed"),
                     "sltrain": ()}[self.parameterization]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    unused = [n for n in unused_fields if getattr(self, n) != defaults[n]]
    if unused:
      raise UserError(f"ModelConfig.{unused[0]} is set but parameterization="
                      f"{self.parameterization!r} does not use it; bind ModelConfig."
                      "parameterization = 'sltrain' or drop it")

  def is_moe_block(self, index: int) -> bool:
    """Whether block `index`'s MLP is a mixture of experts (ModelConfig.moe_layers)."""
    if self.moe_layers == "all":
      return True
    if self.moe_layers == "every_other":
      return index % 2 == 1
    return index in self.moe_layers

  @property
  def moe_blocks(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_block(i))

  @property
  def resolved_expert_mlp_dim(self) -> int:
    return self.expert_mlp_dim or self.mlp_dim

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def rope_scaling_params(self) -> tuple | None:
    """What `jaxlm.model.layers.rope_tables` takes: None, or (kind, factor, low, high, orig)."""
    if self.rope_scaling is None:
      return None
    return (self.rope_scaling, self.rope_scaling_factor, self.rope_low_freq_factor,
            self.rope_high_freq_factor, self.rope_original_max_len)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def check_seq_len(self, seq_len: int) -> None:
    if not 1 <= seq_len <= self.max_seq_len:
      raise UserError(
          f"sequence length {seq_len} is outside what the model takes (1..max_seq_len="
          f"{self.max_seq_len}); lower DataConfig.seq_len or raise ModelConfig.max_seq_len")
