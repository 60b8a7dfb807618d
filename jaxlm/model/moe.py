"""A mixture-of-experts MLP: E SwiGLU experts behind a top-k router (Shazeer et al. 2017,
1701.06538; GShard 2006.16668; Switch 2101.03961; Mixtral 2401.04088).

A block is an MoE layer when ModelConfig.moe_layers names it. Each token's router logits
(float32) pick k experts; the token's output is the weighted sum of those experts' SwiGLU
outputs. Two ways to send tokens to experts, the same function wherever no token is dropped:

- **dropless**: the token copies are sorted by expert and each expert multiplies its own
  contiguous rows (`jax.lax.ragged_dot`, a grouped matmul). Nothing is dropped. On GPU and TPU
  this is a grouped GEMM; XLA:CPU lowers it to a dense product over every expert (E/k times the
  FLOPs), so on CPU it is for checks, not speed.
- **capacity**: each batch row is a group; every expert takes at most
  C = ceil(L k / E x capacity_factor) of its tokens, first choices before second ones (GShard);
  the rest are dropped (their output is the residual alone) and counted. Tokens move into the
  experts' [E, C] slots and back by index (gathers), and the experts' matmuls are einsums over
  [B, E, C, ...] that XLA partitions over an `expert` mesh axis.

The layer owns its auxiliary losses (sown under "losses", added to training by the train step):
load balancing E sum_i f_i P_i (f_i: the share of the k-choices routed to expert i, P_i: the
mean router probability of expert i; 1.0 when perfectly balanced) and the router z-loss
mean(logsumexp(logits)^2). It sows its expert load f_i and the dropped share under "metrics".
"""

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import Role, param_with_axes, swiglu


def resolved_dispatch(config: ModelConfig, backend: str | None = None) -> str:
  """The dispatch path a config runs: "auto" is capacity on CPU (0.85x the dense step against
  dropless's 0.26x on bench-tiny, where ragged_dot costs E/k times the FLOPs; measured by
  tools/bench_moe.py) and dropless elsewhere (a grouped GEMM on GPU and TPU)."""
  if config.moe_dispatch != "auto":
    return config.moe_dispatch
  return "capacity" if (backend or jax.default_backend()) == "cpu" else "dropless"


def expert_capacity(config: ModelConfig, length: int) -> int:
  """Slots per expert and batch row on the capacity path; an expert never needs more than one
  per token of the row (a token picks k distinct experts)."""
  wanted = math.ceil(length * config.experts_per_token * config.capacity_factor /
                     config.num_experts)
  return max(1, min(length, wanted))


def route(logits_TE, config: ModelConfig):
  """(weights [T, k], expert ids [T, k]) from float32 router logits (ModelConfig.router)."""
  k = config.experts_per_token
  if config.router == "softmax_topk":
    return jax.lax.top_k(jax.nn.softmax(logits_TE, axis=-1), k)
  top_logits_TK, experts_TK = jax.lax.top_k(logits_TE, k)
  return jax.nn.softmax(top_logits_TK, axis=-1), experts_TK


def balancing_losses(logits_TE, experts_TK, num_experts: int):
  """(load-balancing loss E sum_i f_i P_i, router z-loss, load f [E]) for one layer's tokens."""
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  load_E = jnp.mean(jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.float32), axis=(0, 1))
  balance = num_experts * jnp.sum(load_E * jnp.mean(probs_TE, axis=0))
  z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))
  return balance, z_loss, load_E


def dropless_experts(x_TD, weights_TK, experts_TK, w_gate_up_ED2F, w_down_EFD):
  """Every token's k experts, grouped by expert with ragged_dot; nothing dropped."""
  t, k = experts_TK.shape
  e, d, _, f = w_gate_up_ED2F.shape
  flat_N = experts_TK.reshape(-1)  # N = T k token copies, token-major.
  order_N = jnp.argsort(flat_N, stable=True)
  group_sizes_E = jnp.bincount(flat_N, length=e).astype(jnp.int32)
  x_ND = jnp.take(x_TD, order_N // k, axis=0)
  gate_up_N2F = jax.lax.ragged_dot(x_ND, w_gate_up_ED2F.reshape(e, d, 2 * f),
                                   group_sizes_E).reshape(-1, 2, f)
  y_ND = jax.lax.ragged_dot(swiglu(gate_up_N2F), w_down_EFD, group_sizes_E)
  y_TKD = jnp.zeros_like(y_ND).at[order_N].set(y_ND).reshape(t, k, d)
  return jnp.einsum("tk,tkd->td", weights_TK.astype(y_TKD.dtype), y_TKD)


def capacity_experts(x_BLD, weights_BLK, experts_BLK, w_gate_up_ED2F, w_down_EFD, capacity):
  """Every batch row's tokens dispatched to at most `capacity` slots per expert, first choices
  first (GShard's priority); returns (output [B, L, D], share of token copies dropped).

  Tokens move by index (a gather into the [E, C] slots, a gather back out), not by GShard's
  one-hot [B, L, E, C] einsums: on CPU those cost about as many FLOPs as the experts
  themselves (bench-tiny, 8 experts: 0.62x the dense step with them; tools/bench_moe.py)."""
  b, l, k = experts_BLK.shape
  e, d = w_gate_up_ED2F.shape[0], x_BLD.shape[-1]
  chosen_BKLE = jax.nn.one_hot(experts_BLK.swapaxes(1, 2), e, dtype=jnp.int32)
  # Slot of each copy in its expert's queue: count earlier copies, all first choices first.
  slot_BKLE = jnp.cumsum(chosen_BKLE.reshape(b, k * l, e), axis=1).reshape(b, k, l, e) - 1
  slot_BLK = jnp.sum(slot_BKLE * chosen_BKLE, axis=-1).swapaxes(1, 2)
  kept_BLK = slot_BLK < capacity
  # Each kept copy's row in the row's [E * C] slots; a dropped copy goes to slot E * C, a row of
  # zeros on the way in and out.
  where_BLK = jnp.where(kept_BLK, experts_BLK * capacity + slot_BLK, e * capacity)
  rows_B1 = jnp.arange(b)[:, None]
  token_BS = jnp.full((b, e * capacity + 1), l, jnp.int32).at[
      rows_B1, where_BLK.reshape(b, l * k)].set(jnp.repeat(jnp.arange(l, dtype=jnp.int32), k))
  padded_BLD = jnp.concatenate([x_BLD, jnp.zeros((b, 1, d), x_BLD.dtype)], axis=1)
  x_BECD = jnp.take_along_axis(padded_BLD, token_BS[:, :-1, None], axis=1).reshape(
      b, e, capacity, d)
  x_BECD = nn.with_logical_constraint(x_BECD, ("expert_batch", "expert", None, "embed"))
  gate_up_BEC2F = jnp.einsum("becd,edtf->bectf", x_BECD, w_gate_up_ED2F)
  h_BECF = nn.with_logical_constraint(swiglu(gate_up_BEC2F),
                                      ("expert_batch", "expert", None, "mlp"))
  y_BECD = jnp.einsum("becf,efd->becd", h_BECF, w_down_EFD)
  y_BECD = nn.with_logical_constraint(y_BECD, ("expert_batch", "expert", None, "embed"))
  y_BSD = jnp.concatenate([y_BECD.reshape(b, e * capacity, d), jnp.zeros((b, 1, d), y_BECD.dtype)],
                          axis=1)
  y_BLKD = jnp.take_along_axis(y_BSD, where_BLK.reshape(b, l * k, 1), axis=1).reshape(b, l, k, d)
  out_BLD = jnp.einsum("blk,blkd->bld", weights_BLK.astype(y_BLKD.dtype), y_BLKD)
  return out_BLD, 1.0 - jnp.mean(kept_BLK.astype(jnp.float32))


class MoEMLP(nn.Module):
  """E SwiGLU experts ([expert, embed, mlp] gate and up, [expert, mlp, embed] down) and a
  float32 router [embed, expert]."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"router": Role("moe.router", reads=("embed",), prunable=False),
                           "gate": Role("mlp.gate", reads=("embed",), routed=True),
                           "up": Role("mlp.up", reads=("embed",), routed=True),
                           "down": Role("mlp.down", reads=("mlp",), routed=True)}

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    e, f = cfg.num_experts, cfg.resolved_expert_mlp_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    w_router = param_with_axes(self, "router", init, (cfg.d_model, e), ("embed", "expert"),
                               "float32")
    w_gate = param_with_axes(self, "gate", init, (e, cfg.d_model, f), ("expert", "embed", "mlp"),
                             cfg.param_dtype)
    w_up = param_with_axes(self, "up", init, (e, cfg.d_model, f), ("expert", "embed", "mlp"),
                           cfg.param_dtype)
    w_down = param_with_axes(self, "down", out_init, (e, f, cfg.d_model),
                             ("expert", "mlp", "embed"), cfg.param_dtype)
    b, l, d = x_BLD.shape
    logits_BLE = jnp.einsum("bld,de->ble", x_BLD.astype(jnp.float32), w_router)
    logits_TE = logits_BLE.reshape(b * l, e)
    weights_TK, experts_TK = route(logits_TE, cfg)
    balance, z_loss, load_E = balancing_losses(logits_TE, experts_TK, e)
    self.sow("losses", "load_balancing", cfg.load_balancing_weight * balance)
    self.sow("losses", "router_z", cfg.router_z_loss_weight * z_loss)
    self.sow("metrics", "expert_load", load_E)

    dtype = cfg.compute_dtype
    w_gate_up_ED2F = jnp.stack([w_gate, w_up], axis=2).astype(dtype)
    w_down_EFD = w_down.astype(dtype)
    k = cfg.experts_per_token
    if resolved_dispatch(cfg) == "dropless":
      out_TD = dropless_experts(x_BLD.reshape(b * l, d), weights_TK, experts_TK, w_gate_up_ED2F,
                                w_down_EFD)
      out_BLD, dropped = out_TD.reshape(b, l, d), jnp.zeros((), jnp.float32)
    else:
      out_BLD, dropped = capacity_experts(
          x_BLD, weights_TK.reshape(b, l, k), experts_TK.reshape(b, l, k), w_gate_up_ED2F,
          w_down_EFD, expert_capacity(cfg, l))
    self.sow("metrics", "dropped_fraction", dropped)
    return nn.with_logical_constraint(out_BLD.astype(dtype), ("batch", "length", "embed"))
