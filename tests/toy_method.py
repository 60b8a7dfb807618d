"""A toy method registered only through the stage hooks, as a user's own module would be
(a gin file says `import toy_method`): a transition that widens every MLP with zero units
(function-preserving) and a method that keeps a fixed mask of the MLP 'up' weights at zero
after every update, counting its density as a metric."""

import gin
import jax.numpy as jnp

from jaxlm.methods import Method
from jaxlm.methods.transition import transition


def _pad_to(x, shape):
  return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


@gin.configurable("toy_widen_mlp")
@transition("toy_widen_mlp")
def widen_mlp(state, ctx):
  """New MLP units have zero gate, up and down weights: silu(0) * 0 = 0, so the function is
  unchanged."""
  width = ctx.following.model.mlp_dim
  params = dict(state.params)
  for name, layer in state.params.items():
    if name.startswith("layer_"):
      mlp = layer["mlp"]
      d = mlp["up"].shape[0]
      params[name] = {**layer, "mlp": {"gate": _pad_to(mlp["gate"], (d, width)),
                                       "up": _pad_to(mlp["up"], (d, width)),
                                       "down": _pad_to(mlp["down"], (width, d))}}
  return state.replace(params=params)


def _up_weights(params):
  return {name: layer["mlp"]["up"] for name, layer in params.items() if name.startswith("layer_")}


@gin.configurable
def toy_fixed_mask(keep_every: int = 2) -> Method:
  """Keeps every `keep_every`-th column of each MLP 'up' weight; the rest stay zero."""

  def init(params, rng):
    del rng
    return {name: (jnp.arange(w.shape[1]) % keep_every == 0).astype(w.dtype)[None, :]
            * jnp.ones_like(w) for name, w in _up_weights(params).items()}

  def state_axes(param_axes):
    return {name: axes for name, axes in _up_weights(param_axes).items()}

  def after_update(state, grads, step):
    del grads, step
    masks = state.method_state["toy_mask"]
    params = {name: ({**layer, "mlp": {**layer["mlp"], "up": layer["mlp"]["up"] * masks[name]}}
                     if name in masks else layer) for name, layer in state.params.items()}
    return state.replace(params=params)

  def metrics(state):
    masks = state.method_state["toy_mask"]
    kept = sum(jnp.sum(m) for m in masks.values())
    return {"density": kept / sum(m.size for m in masks.values())}

  return Method("toy_mask", init=init, state_axes=state_axes, after_update=after_update,
                metrics=metrics)


def is_masked_to_zero(params, masks) -> bool:
  return all(bool(jnp.all(jnp.where(masks[name] == 0, w == 0, True)))
             for name, w in _up_weights(params).items())


