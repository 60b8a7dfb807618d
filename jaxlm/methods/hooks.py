"""The few named points where a method touches the train step.

A stage lists its methods (`Stage.methods = [@nm_sparsity()]`); each is a `Method`: a name and
up to six pure functions, every one optional. The step calls them in list order:

    init(params, rng) -> method_state             # once, when the stage starts without it
    state_axes(param_axes) -> logical axes        # of that state (None: replicated)
    params_for_loss(params, method_state, step) -> params     # what the loss sees: STE masks,
                                                  # masked growth, a learned growth operator
    aux_losses(params, method_state, intermediates) -> {name: scalar}   # added to the loss and
                                                  # logged as train/aux/<name> (MoE balancing)
    after_update(state, grads, step) -> state     # re-apply masks, periodic mask updates
    metrics(state) -> {name: scalar}              # logged as train/<method name>/<name>
    for_stage(model, num_steps) -> Method         # the method for a stage's model (its
                                                  # anatomy) and length (schedules over the
                                                  # stage), made when the Stage is built
    masks(method_state) -> {param name: bool}     # the sparsity masks it keeps, for the
                                                  # 'densify' transition after its stage

`step` is the step within the stage (what its schedule sees), `state` the whole TrainState,
whose `method_state[name]` holds what the method keeps between steps: it is sharded by
`state_axes`, checkpointed with the params and restored on resume. `intermediates` are the
values the model sows into flax's "intermediates" collection (empty for the dense model).

A step whose loss, gradients or update are not finite is skipped whole: `after_update` results
are dropped with the update. A model with no methods runs exactly the plain step.
"""

import dataclasses
from typing import Any, Callable

import jax

Hook = Callable[..., Any] | None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  init: Hook = None
  state_axes: Hook = None
  params_for_loss: Hook = None
  aux_losses: Hook = None
  after_update: Hook = None
  metrics: Hook = None
  for_stage: Hook = None
  masks: Hook = None


def init_method_state(methods, params, rng, existing=None) -> dict:
  """{name: state} for `methods`: `existing` entries are kept, a method with no entry is
  initialised (its rng folded from `rng` by its position); states of other methods are dropped."""
  existing = existing or {}
  state = {}
  for i, method in enumerate(methods):
    if method.name in existing:
      state[method.name] = existing[method.name]
    elif method.init is not None:
      state[method.name] = method.init(params, jax.random.fold_in(rng, i))
  return state


@dataclasses.dataclass(frozen=True)
class MethodHooks:
  """A stage's methods, as the train step applies them."""
  methods: tuple[Method, ...] = ()

  def _with(self, hook: str) -> list[Method]:
    return [m for m in self.methods if getattr(m, hook) is not None]

  @property
  def wants_intermediates(self) -> bool:
    return bool(self._with("aux_losses"))

  def params_for_loss(self, params, method_state, step):
    for method in self._with("params_for_loss"):
      params = method.params_for_loss(params, method_state.get(method.name), step)
    return params

  def aux_losses(self, params, method_state, intermediates) -> dict[str, jax.Array]:
    losses = {}
    for method in self._with("aux_losses"):
      for key, value in method.aux_losses(params, method_state.get(method.name),
                                          intermediates).items():
        losses[f"{method.name}/{key}"] = value
    return losses

  def after_update(self, state, grads, step):
    for method in self._with("after_update"):
      state = method.after_update(state, grads, step)
    return state

  def metrics(self, state) -> dict[str, jax.Array]:
    return {f"train/{method.name}/{key}": value for method in self._with("metrics")
            for key, value in method.metrics(state).items()}
