"""Sparse upcycling: a trained dense model's MLPs become mixture-of-experts layers.

    moe/Stage.model = @moe/ModelConfig()        # moe_layers, num_experts, experts_per_token ...
    moe/Stage.transition = [@upcycle]
    upcycle.granularity = 1                     # G > 1: fine-grained experts (2410.07524)

- granularity 1 (Komatsuzaki et al. 2212.05055): every expert is a copy of the dense MLP, the
  router freshly initialised, everything else copied.
- granularity G (He et al. 2410.07524, "virtual groups"): the dense MLP's hidden units are cut
  into G shards (gate and up by columns, down by rows); expert k*G + g holds shard g, so each
  group of G experts together is the dense MLP. The router has E/G fresh rows, each repeated
  for the G experts of its group, so a token picks whole groups (experts_per_token must be a
  multiple of G).
- scale: the experts' outputs are multiplied by a factor (applied to `down`, the one linear
  GLU matrix, so the factor is exact). With router "topk_softmax" the chosen experts' weights
  sum to 1 and each expert of a chosen group has 1/G of its group's weight: factor G makes
  the upcycled layer the dense MLP exactly. With "softmax_topk" the weights are each expert's
  share of all E, about 1/E apiece under a fresh router: factor E*G/k (the paper's and
  Megatron-LM's) makes the output the dense MLP's when the router is uniform. Megatron spreads
  it as s^(1/3) over the GLU's three matrices, which through SiLU is not the same function;
  on `down` alone it is. `upcycle.scale` overrides it (1.0: T5X's unscaled copies).

The optimizer state of the new tensors starts fresh: with Stage.keep_optimizer_state the other
params keep their moments and the experts' and routers' moments start at zero.
"""

import dataclasses

import gin
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.methods.growth.transitions import num_layers_of
from jaxlm.methods.transition import TransitionContext, kept_moments, transition
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.anatomy import anatomy
from jaxlm.model.config import MOE_FIELDS, RUN_FIELDS

def upcycle_scale(moe: ModelConfig, granularity: int) -> float:
  """The factor on the experts' outputs that keeps the dense function (see the module doc)."""
  if moe.router == "topk_softmax":
    return float(granularity)
  return moe.num_experts * granularity / moe.experts_per_token


def check_upcycle(dense: ModelConfig, moe: ModelConfig, granularity: int) -> None:
  """One line for whatever upcycling `dense` into `moe` cannot do."""
  if granularity < 1 or dense.mlp_dim % granularity or moe.num_experts % granularity:
    raise UserError(f"upcycle.granularity={granularity} must divide both the dense mlp_dim "
                    f"({dense.mlp_dim}) and num_experts ({moe.num_experts})")
  if moe.experts_per_token % granularity:
    raise UserError(f"upcycle.granularity={granularity} needs ModelConfig.experts_per_token a "
                    f"multiple of it (a token must pick whole groups of shards), not "
                    f"{moe.experts_per_token}")
  if moe.resolved_expert_mlp_dim != dense.mlp_dim // granularity:
    raise UserError(f"upcycling mlp_dim {dense.mlp_dim} into {granularity} shard(s) gives experts "
                    f"of {dense.mlp_dim // granularity} units; set the MoE model's "
                    f"ModelConfig.expert_mlp_dim = {dense.mlp_dim // granularity}")
  if not moe.moe_blocks:
    raise UserError("upcycle: the next stage's model has no MoE layer; bind its "
                    "ModelConfig.moe_layers")
  if all(dense.is_moe_block(b) for b in moe.moe_blocks):
    raise UserError(f"upcycle: every MoE block of the next stage ({list(moe.moe_blocks)}) is one "
                    "already, so there is no dense MLP to copy; upcycle from a dense model")
  ignored = {"moe_layers", *MOE_FIELDS, *RUN_FIELDS}  # What upcycling sets, how a model runs.
  changed = [f.name for f in dataclasses.fields(dense)
             if f.name not in ignored and getattr(moe, f.name) != getattr(dense, f.name)]
  if changed:
    raise UserError(f"upcycle changes MLPs into experts only, but the next stage's model also "
                    f"changes {changed}; grow or change those in an earlier transition")


def _experts(dense_leaf, kind: str, num_experts: int, granularity: int, scale: float):
  """A dense GLU matrix as [E, ...] expert matrices: expert k*G + g holds hidden shard g."""
  if kind == "mlp.down":  # [F, D] -> G row shards.
    f, d = dense_leaf.shape
    shards = dense_leaf.reshape(granularity, f // granularity, d) * scale
  else:  # [D, F] -> G column shards.
    d, f = dense_leaf.shape
    shards = dense_leaf.reshape(d, granularity, f // granularity).transpose(1, 0, 2)
  return jnp.tile(shards, (num_experts // granularity, 1, 1))


def upcycle_params(tree, dense: ModelConfig, moe: ModelConfig, fresh, granularity: int = 1,
                   scale: float | None = None, moments: bool = False):
  """The `dense` model's param-shaped `tree` as `moe`'s: the MLPs of moe's MoE blocks turned
  into experts and a router (from `fresh`, an init of `moe`; E/G of its rows repeated G
  times), every other leaf copied. `moments`: the tree is an optimizer moment, so the new
  tensors start at zero."""
  check_upcycle(dense, moe, granularity)
  scale = upcycle_scale(moe, granularity) if scale is None else scale
  dense_parts, out = anatomy(dense), {}
  for part in anatomy(moe):
    upcycled = (part.block is not None and moe.is_moe_block(part.block)
                and not dense.is_moe_block(part.block)
                and (part.role.routed or part.kind == "moe.router"))
    if not upcycled:
      value = dense_parts[part.name].get(tree)
    elif part.kind == "moe.router":
      groups = moe.num_experts // granularity
      value = jnp.repeat(part.get(fresh)[:, :groups], granularity, axis=1)
      value = jnp.zeros_like(value) if moments else value
    else:
      source = dense_parts.one(part.kind, part.block)
      if source is None:
        raise UserError(f"upcycling needs a gated MLP (gate, up, down); block {part.block}'s "
                        f"MLP ({dense.mlp!r}) has no {part.kind!r}")
      value = _experts(source.get(tree), part.kind, moe.num_experts, granularity,
                       1.0 if moments else scale)
      value = jnp.zeros_like(value) if moments else value
    node = out
    for key in part.path[:-1]:
      node = node.setdefault(key, {})
    node[part.path[-1]] = value
  return out


@gin.configurable("upcycle")
@transition("upcycle")
def upcycle_transition(state, ctx: TransitionContext, granularity: int = 1,
                       scale: float | None = None):
  """The previous stage's dense MLPs become the next stage's MoE layers (sparse upcycling)."""
  previous = ctx.previous.model
  dense = dataclasses.replace(previous, num_layers=num_layers_of(state.params, previous))
  moe = ctx.following.model
  fresh = init_params(moe, ctx.rng)
  grow = lambda tree, moments: upcycle_params(tree, dense, moe, fresh, granularity, scale,
                                              moments)
  return state.replace(params=grow(state.params, False), opt_state=kept_moments(
      state, ctx, lambda tree: grow(tree, True), "upcycle"))
