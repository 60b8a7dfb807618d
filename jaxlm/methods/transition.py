"""What a method family needs to define a stage transition: the `transition` mark, the context a
transition is given, and `identity` (a stage's default). A transition maps the previous stage's
final TrainState to the next stage's first one; how a run applies them is training/stages.py.

    @gin.configurable
    @transition()                                   # needs_method="msg": the stage must list it
    def grow_mlp(state, ctx: TransitionContext):    # -> the state the next stage starts from
      return state.replace(params=...)

    large/Stage.transition = [@grow_mlp]            # in gin; the default is @identity
"""

import dataclasses
from typing import Any, Callable

import gin

from jaxlm.optim.state_layout import map_same_trees


# A transition: (train state, TransitionContext) -> train state for the next stage.
Transition = Callable[[Any, "TransitionContext"], Any]


def transition(name: str | None = None, needs_method: str | None = None):
  """Marks a gin-configurable function (state, ctx) -> state as a stage transition, so that
  `Stage.transition = [@grow_width]` can check what it is given. `name`: its gin name, when not
  the function's; `needs_method`: the name of a method the next stage must list (its state is
  where the transition writes)."""
  def mark(fn: Transition) -> Transition:
    fn.jaxlm_transition = True
    fn.transition_name = name or fn.__name__
    fn.needs_method = needs_method
    return fn
  return mark


@gin.configurable
@transition()
def identity(state, ctx):
  """Carry the state over unchanged; the model must not change shape."""
  del ctx
  return state


def transition_name(fn) -> str:
  return getattr(fn, "transition_name", repr(fn))


@dataclasses.dataclass(frozen=True)
class TransitionContext:
  """What a transition may use besides the state: both stages, an rng derived from the run seed
  and the next stage's index, both stages' tokenizers (vocabulary expansion), and the next
  stage's TrainState of NamedShardings (for sharding constraints inside the transition)."""
  previous: Any  # training.stages.Stage
  following: Any
  rng: Any
  previous_tokenizer: Any = None
  following_tokenizer: Any = None
  shardings: Any = None


def kept_moments(state, ctx: TransitionContext, grow, operation: str):
  """The optimizer state changed like the params (`grow` of each param-shaped tree of moments)
  when the next stage keeps it; otherwise as it is, since the stage starts a fresh one. A
  state with leaves of other shapes (factored, low-rank) is refused with one line."""
  if not ctx.following.keep_optimizer_state:
    return state.opt_state
  return map_same_trees(state.opt_state, state.params, grow, operation,
                        ctx.previous.make_optimizer())
