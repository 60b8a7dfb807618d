"""MSG, masked structural growth (Yao et al. 2305.02869): grow, then let the new structure in
gradually. Every new MLP unit, residual dimension, head and layer is multiplied by a mask that
ramps 0 -> 1, so at growth the large model computes exactly the small one, whatever the new
weights are (here: the large model's fresh initialisation, as the paper's random init).

    grow/Stage.transition = [@msg_grow]       # small -> large: old weights copied, new fresh
    grow/Stage.methods = [@msg()]             # the masks, in the method state
    msg.ramp_steps = 50                       # each mask ramps linearly over this many steps,
    msg.phases = ["mlp", "embed", "heads", "layers"]   # one after another, as the paper stages
                                              # its growth: FFN, hidden, heads, layers

The masks act on what each new piece writes: a new unit's `down` row, a new head's `out` rows,
a new dimension's embedding, `out` and `down` columns, a new layer's `out` and `down`. RMSNorm
gains are scaled by sqrt((D_old + m (D_new - D_old)) / D_new), the paper's norm rescaling, so
the RMS over the partly-masked stream matches; exact at m = 0 when the large model's norm_eps is
eps * D_old / D_new (jaxlm.methods.growth.width.exact_norm_eps). A new layer here outputs
x + m·attn(x) + m·mlp(x + m·attn(x)) rather than the paper's m·block(x) + (1 - m)·x: the same
at m = 0 and m = 1, which is where function preservation is claimed.

Once every mask is 1 the multiplications are by exactly 1.0: the params are plain weights, and a
later stage without the method (its state dropped) computes the same function.
"""

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.methods.growth.axis_maps import AxisMap
from jaxlm.methods.growth.width import grow_tree, width_maps
from jaxlm.methods.hooks import Method
from jaxlm.model import init_params
from jaxlm.model.anatomy import Anatomy, anatomy
from jaxlm.methods.transition import TransitionContext, kept_moments, transition

PHASES = ("mlp", "embed", "heads", "layers")
NAME = "msg"


def mask_values(new: dict, step, ramp_steps: int, phases: tuple[str, ...]) -> dict:
  """{structure: mask vector}: 1 for old entries, the phase's ramp value for new ones."""
  masks = {}
  for i, phase in enumerate(phases):
    ramp = jnp.clip((step - i * ramp_steps) / ramp_steps, 0.0, 1.0)
    masks[phase] = 1.0 - new[phase] * (1.0 - ramp)
  return masks


def masked_params(params, parts: Anatomy, masks: dict):
  """What the loss sees: new structure scaled by its mask (see the module docstring). `parts`:
  the large model's anatomy; the embedding's columns, every residual writer's (attention out,
  MLP down) rows and columns of the masked structures, and its whole block by the layer mask."""
  m_embed = masks["embed"]
  # MSG's norm rescaling: the gain times sqrt(live dimensions / all), live = sum of the mask.
  gain = jnp.sqrt(jnp.sum(m_embed) / m_embed.shape[0])
  writers = {p.name for block in range(parts.num_blocks) for p in parts.residual_writers(block)}

  def mask(path, value):
    part = parts[tuple(str(k.key) for k in path)]
    if part.kind == "norm":
      return value * gain
    if part.kind == "embedding":
      return value * _along(m_embed, part.axes.index("embed"), value.ndim)
    if part.name not in writers:
      return value
    factor = None
    for axis, name in enumerate(part.axes):
      if name in ("mlp", "heads", "embed"):
        m = _along(masks[name], axis, value.ndim)
        factor = m if factor is None else factor * m
    return value * (factor * masks["layers"][part.block])

  return jax.tree_util.tree_map_with_path(mask, params)


def _along(vector, axis: int, ndim: int):
  return vector.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _new_flags(small_sizes: dict, large_sizes: dict) -> dict:
  return {k: (jnp.arange(large_sizes[k]) >= small_sizes[k]).astype(jnp.float32)
          for k in PHASES}


@gin.configurable
def msg(ramp_steps: int = 50, phases=PHASES) -> Method:
  """The MSG masks as a stage method; its state ({structure: 1.0 where new}) is written by the
  'msg_grow' transition."""
  phases = tuple(phases)
  if sorted(phases) != sorted(PHASES):
    raise UserError(f"msg.phases={list(phases)} must order each of {list(PHASES)} once")
  if not isinstance(ramp_steps, int) or ramp_steps < 1:
    raise UserError(f"msg.ramp_steps={ramp_steps!r} must be a whole number of steps >= 1")

  def for_stage(model, num_steps):
    del num_steps
    parts = anatomy(model)

    def init(params, rng):  # Nothing new until the msg_grow transition says what is.
      del rng
      sizes = parts.sizes(params)
      return _new_flags(sizes, sizes)

    def params_for_loss(params, state, step):
      return masked_params(params, parts, mask_values(state, step, ramp_steps, phases))

    return Method(NAME, init=init, params_for_loss=params_for_loss)
  return Method(NAME, for_stage=for_stage)


@gin.configurable
@transition(needs_method=NAME)
def msg_grow(state, ctx: TransitionContext):
  """Small -> large for MSG: old weights copied into the large model's fresh initialisation
  (no zeroing, no rescaling: the masks do that), and the method state flags what is new."""
  small, large = ctx.previous.model, ctx.following.model
  for field in ("d_model", "mlp_dim", "num_heads", "num_kv_heads", "num_layers"):
    if getattr(large, field) < getattr(small, field):
      raise UserError(f"MSG grows: ModelConfig.{field} {getattr(small, field)} -> "
                      f"{getattr(large, field)} shrinks")
  # MSG (2305.02869) grows the sizes only: these would otherwise fail as a pytree mismatch, or
  # (vocabulary) pass with the wrong embedding shape.
  for field in ("vocab_size", "tie_embeddings", "attention_bias", "mlp"):
    if getattr(small, field) != getattr(large, field):
      raise UserError(f"MSG keeps ModelConfig.{field} ({getattr(small, field)!r} -> "
                      f"{getattr(large, field)!r}); change it in a separate transition")
  if (large.num_heads // large.num_kv_heads != small.num_heads // small.num_kv_heads
      or large.resolved_head_dim != small.resolved_head_dim):
    raise UserError("MSG adds whole heads: head_dim and num_heads / num_kv_heads must stay "
                    f"({small.resolved_head_dim}, {small.num_heads // small.num_kv_heads})")
  # Also when d_model stays (then the same epsilon): else mask 0 is not the small model.
  if not math.isclose(large.norm_eps, small.norm_eps * small.d_model / large.d_model,
                      rel_tol=1e-6):
    raise UserError(f"MSG from d_model {small.d_model} to {large.d_model} is exact only with "
                    f"the large model's ModelConfig.norm_eps = {small.norm_eps} x "
                    f"{small.d_model}/{large.d_model} (it is {large.norm_eps}); set it")
  fresh = init_params(large, ctx.rng)
  wide = dataclasses.replace(large, num_layers=small.num_layers)
  maps = {k: AxisMap(m.source, np.ones(m.size), zero_side=None)  # New entries: all fresh.
          for k, m in width_maps(small, wide, "zero", "zero", "exact").items()}
  grown = grow_tree(state.params, anatomy(wide), maps,
                    {k: v for k, v in fresh.items() if k in state.params}, d_model="copy")
  params = {**fresh, **grown}  # Layers beyond the small depth: fresh, masked to identity.
  flags = _new_flags({"mlp": small.mlp_dim, "embed": small.d_model, "heads": small.num_heads,
                      "layers": small.num_layers}, anatomy(large).sizes(params))

  def grow_moments(tree):  # Kept when the stage keeps its optimizer state: new entries zero.
    wide_tree = grow_tree(tree, anatomy(wide), maps, moments=True)
    return {**jax.tree.map(jnp.zeros_like, fresh), **wide_tree}
  return state.replace(params=params, method_state={**state.method_state, NAME: flags},
                       opt_state=kept_moments(state, ctx, grow_moments, "msg_grow"))
