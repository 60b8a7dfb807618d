"""Growth as stage transitions: the previous stage's model -> the next stage's, inside one run.

    grow/Stage.model = @large/ModelConfig()
    grow/Stage.transition = [@grow_width, @grow_depth]     # applied in this order
    grow_width.mlp = "fpi"          # "aki", "zero"; heads "fpi"/"zero"; d_model "exact"/"copy"
    grow_depth.order = "stack"      # "interleave"; zero_copies = True: identity insertion
    grow/Stage.keep_optimizer_state = False   # the papers' fresh optimizer; True: grown moments

Each transition reads the current sizes from the params it is given, so they compose: widen,
then deepen. When the stage keeps its optimizer state, Adam moments (the param-shaped parts of
the optimizer state, jaxlm.optim.state_layout) are grown with the same index maps (copies
unscaled, new entries zero), and a state with factored or low-rank leaves is refused; otherwise
the next stage initialises a fresh one, as G_stack, bert2BERT and LiGO do.
"""

import dataclasses
import math

import gin

from jaxlm.errors import UserError
from jaxlm.methods.growth.depth import depth_sources, grow_depth
from jaxlm.methods.growth.width import check_width, grow_tree, grow_width, width_maps
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.anatomy import anatomy
from jaxlm.methods.transition import TransitionContext, kept_moments, transition


def num_layers_of(params, config: ModelConfig) -> int:
  """Blocks in `params`, a model of `config`'s kind at whatever depth it has now."""
  return len(anatomy(config).blocks_in(params))


def _current_small(ctx: TransitionContext, params):
  """The previous stage's model at the depth `params` has now (after earlier transitions)."""
  previous = ctx.previous.model
  return dataclasses.replace(previous, num_layers=num_layers_of(params, previous))


@gin.configurable("grow_width")
@transition("grow_width")
def grow_width_transition(state, ctx: TransitionContext, mlp: str = "fpi", heads: str = "fpi",
                          d_model: str = "exact"):
  """MLP units, heads and d_model grown to the next stage's (jaxlm.methods.growth.width)."""
  small = _current_small(ctx, state.params)
  large = dataclasses.replace(ctx.following.model, num_layers=small.num_layers)
  check_width(small, large, mlp, heads, d_model)
  params = grow_width(state.params, small, large, init_params(large, ctx.rng), mlp, heads,
                      d_model)
  maps, parts = width_maps(small, large, mlp, heads, d_model), anatomy(large)
  return state.replace(params=params, opt_state=kept_moments(
      state, ctx, lambda m: grow_tree(m, parts, maps, moments=True), "grow_width"))


@gin.configurable("grow_depth")
@transition("grow_depth")
def grow_depth_transition(state, ctx: TransitionContext, order: str = "stack",
                          zero_copies: bool = False):
  """Layers copied to the next stage's depth (jaxlm.methods.growth.depth)."""
  previous, following = ctx.previous.model, ctx.following.model
  if (zero_copies and previous.d_model == following.d_model  # Else the width's to check.
      and not math.isclose(previous.norm_eps, following.norm_eps, rel_tol=1e-6)):
    # Identity insertion (G_stack 2405.15319 with zeroed copies) is exact only at the same eps.
    raise UserError(f"grow_depth.zero_copies keeps the function only with the same "
                    f"ModelConfig.norm_eps, but it changes {previous.norm_eps} -> "
                    f"{following.norm_eps}; set the large model's norm_eps = {previous.norm_eps}")
  sources = depth_sources(num_layers_of(state.params, previous), following.num_layers, order)
  grow = lambda tree: grow_depth(tree, sources, anatomy(previous), zero_copies)
  return state.replace(params=grow(state.params),
                       opt_state=kept_moments(state, ctx, grow, "grow_depth"))
