"""LiGO, learned linear growth operators (Wang et al. 2303.00980).

The large model's weights are a linear function of the small model's: along every grown axis a
width matrix B_axis [new, old] (one per module family: the residual `embed`, `mlp` units,
`heads`, `kv_heads`, shared by all layers), and across depth a mixing matrix W_type [L_new,
L_old] per weight type (query, key, ..., down, the two norms):

    large[layer l][type] = sum_j W_type[l, j] * widen(small[layer j][type])
    widen(x) = x with each grown axis a contracted with B_a (x' = B_a x along a)

As the official code (VITA-Group/LiGO) does, B starts as [I; noise] (new rows N(0, 1/old)) and W
as stacking (W[l, l mod L] = 1), so with no noise the operator is exactly G_stack. The
operator is trained for a few steps on the training loss with the small model frozen, then the
large model trains normally:

    ligo/Stage.transition = [@ligo_grow]         # small params into the method state
    ligo/Stage.methods = [@ligo()]               # ligo.source = the small ModelConfig
    ligo/Stage.num_steps = 100
    train/Stage.transition = [@identity]         # the params are already the grown weights

The stage's params are always the materialised operator output: after each step the operator
takes an Adam step on dL/d(operator) = J^T dL/d(params) (a vjp through the linear map) and the
params are rebuilt from it, so the next stage starts from plain large weights (the method state,
which holds the small model and the operator, is dropped there).
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import optax

from jaxlm.errors import UserError
from jaxlm.methods.growth.depth import depth_sources
from jaxlm.methods.hooks import Method
from jaxlm.model import ModelConfig, init_params, logical_axes
from jaxlm.model.anatomy import Anatomy, Part, anatomy
from jaxlm.methods.transition import TransitionContext, transition
from jaxlm.tree_names import get_named

NAME = "ligo"
WIDTH_AXES = ("embed", "mlp", "heads", "kv_heads")


def init_operator(small: dict, large: dict, types: list[str], rng, noise_std: float | None,
                  order: str = "stack") -> dict:
  """B = [I; N(0, noise_std^2)] per grown axis (noise_std None: 1/sqrt(old)), W = `order`'s
  layer copy map per weight type (`types`: a block's params, named inside the block)."""
  width = {}
  for i, axis in enumerate(a for a in WIDTH_AXES if large[a] > small[a]):
    std = small[axis] ** -0.5 if noise_std is None else noise_std
    noise = std * jax.random.normal(jax.random.fold_in(rng, i),
                                    (large[axis] - small[axis], small[axis]))
    width[axis] = jnp.concatenate([jnp.eye(small[axis]), noise])
  sources = depth_sources(small["layers"], large["layers"], order)
  stacking = jax.nn.one_hot(jnp.asarray(sources), small["layers"])
  return {"width": width, "depth": {t: stacking for t in types}}


def block_types(parts: Anatomy) -> dict[str, Part]:
  """{a block's param named inside the block ("attention/query"): its anatomy entry}."""
  return {"/".join(p.path[1:]): p for p in parts.block_parts(0)}


def _widen(x, axes, width: dict):
  for i, name in enumerate(axes):
    if name in width:
      x = jnp.moveaxis(jnp.tensordot(width[name], x, axes=([1], [i])), 0, i)
  return x


def materialize(operator: dict, small, parts: Anatomy):
  """The large model's params: the operator applied to the small model's (`parts`: its
  anatomy)."""
  width, depth = operator["width"], operator["depth"]
  out = {}
  for key, value in small.items():
    if parts.block_index(key) is None:
      out[key] = jax.tree_util.tree_map_with_path(
          lambda path, x, key=key: _widen(x, parts[(key, *(str(k.key) for k in path))].axes,
                                          width), value)
  blocks, types = parts.blocks_in(small), block_types(parts)
  stacked = {t: jnp.stack([_widen(get_named(small[b], t), part.axes, width) for b in blocks])
             for t, part in types.items()}
  mixed = {t: jnp.tensordot(depth[t], stacked[t], axes=([1], [0])) for t in types}
  for l in range(next(iter(depth.values())).shape[0]):
    block = {}
    for t, value in mixed.items():
      *modules, leaf = types[t].path[1:]
      node = block
      for module in modules:
        node = node.setdefault(module, {})
      node[leaf] = value[l]
    out[parts.block_key(l)] = block
  return out


@dataclasses.dataclass(frozen=True)
class LigoMethod(Method):
  """The LiGO stage method; `start` builds its state from the small model (ligo_grow)."""
  source: ModelConfig | None = None
  start: object = None


@gin.configurable
def ligo(source: ModelConfig = gin.REQUIRED, learning_rate: float = 1e-3,
         noise_std: float | None = None, order: str = "stack") -> Method:
  """The operator as a stage method. `source`: the small model's config (the previous stage's);
  `learning_rate`: Adam's on the operator; `noise_std`: of B's new rows (None: 1/sqrt(old));
  `order`: the depth init ('stack' or 'interleave')."""
  tx = optax.adam(learning_rate)
  small_axes, parts = logical_axes(source), anatomy(source)
  small_sizes = {"embed": source.d_model, "mlp": source.mlp_dim, "heads": source.num_heads,
                 "kv_heads": source.num_kv_heads, "layers": source.num_layers}

  def start(small_params, large_sizes, rng):
    operator = init_operator(small_sizes, large_sizes, list(block_types(parts)), rng,
                             noise_std, order)
    return {"small": small_params, "operator": operator, "optimizer": tx.init(operator)}

  def init(params, rng):  # Shapes only, in practice: ligo_grow writes the real state.
    small_rng, rng = jax.random.split(rng)
    return start(init_params(source, small_rng), parts.sizes(params), rng)

  def state_axes(param_axes):
    del param_axes
    return {"small": small_axes, "operator": None, "optimizer": None}

  def after_update(state, grads, step):
    del step
    own = state.method_state[NAME]
    build = lambda op: materialize(op, own["small"], parts)
    _, pullback = jax.vjp(build, own["operator"])
    (operator_grads,) = pullback(grads)
    updates, optimizer = tx.update(operator_grads, own["optimizer"], own["operator"])
    operator = optax.apply_updates(own["operator"], updates)
    return state.replace(params=build(operator), method_state={
        **state.method_state, NAME: {**own, "operator": operator, "optimizer": optimizer}})

  return LigoMethod(NAME, init=init, state_axes=state_axes, after_update=after_update,
                    source=source, start=start)


@gin.configurable
@transition(needs_method=NAME)
def ligo_grow(state, ctx: TransitionContext):
  """The previous stage's params become the frozen small model of the LiGO method; the params
  become the operator's initial output (G_stack plus noise)."""
  method = ctx.following.method(NAME)  # Declared: the stage checked it lists one.
  small, large = ctx.previous.model, ctx.following.model
  source = method.source
  for field in ("vocab_size", "d_model", "mlp_dim", "num_heads", "num_kv_heads", "num_layers",
                "resolved_head_dim", "tie_embeddings", "attention_bias", "mlp"):
    if getattr(source, field) != getattr(small, field):
      raise UserError(f"ligo.source.{field}={getattr(source, field)!r} but the previous stage's "
                      f"model has {getattr(small, field)!r}; bind ligo.source to that model")
    if field not in ("vocab_size", "resolved_head_dim", "tie_embeddings", "attention_bias",
                     "mlp"):
      if getattr(large, field) < getattr(small, field):
        raise UserError(f"LiGO grows: ModelConfig.{field} {getattr(small, field)} -> "
                        f"{getattr(large, field)} shrinks")
    elif getattr(large, field) != getattr(small, field):
      raise UserError(f"LiGO keeps ModelConfig {field} ({getattr(small, field)!r} -> "
                      f"{getattr(large, field)!r})")
  sizes = {"embed": large.d_model, "mlp": large.mlp_dim, "heads": large.num_heads,
           "kv_heads": large.num_kv_heads, "layers": large.num_layers}
  own = method.start(state.params, sizes, ctx.rng)
  params = materialize(own["operator"], own["small"], anatomy(small))
  return state.replace(params=params, method_state={**state.method_state, NAME: own})
