"""A run is a list of stages.

A stage is (model config, data, optimizer + schedule, number of steps, transition). The transition
maps the previous stage's final params (and optimizer state) to this stage's initial ones; growth,
sparsity, vocabulary expansion and continual pretraining register their own transitions here. A
plain pretraining run is one stage whose transition is never called.
"""

import dataclasses
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

from jaxlm.data.pipeline import DataConfig
from jaxlm.errors import UserError
from jaxlm.validation import check_field_types, check_range
from jaxlm.model import ModelConfig
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.schedules import warmup_cosine


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
  """One phase of training. `None` fields take gin's unscoped defaults when the stage starts."""
  num_steps: int = 1000
  name: str | None = None  # None: the stage's gin scope ("warm" for @warm/Stage()), else "pretrain".
  model: ModelConfig | None = None
  data: DataConfig | None = None
  schedule: Callable = warmup_cosine
  optimizer: Callable = adamw
  transition: str = "identity"
  keep_optimizer_state: bool = False  # Carry Adam moments over the transition (same shapes only).
  restore_from: Any = None  # A restore.RestoreConfig: start this stage from another run.
  # Sources this stage reads from their first row again ("*": all of them); every other source
  # continues where the earlier stages left it.
  restart_sources: tuple[str, ...] = ()

  def __post_init__(self):
    if self.name is None:
      object.__setattr__(self, "name", gin.current_scope_str() or "pretrain")
    if isinstance(self.restart_sources, str) or not all(
        isinstance(s, str) for s in self.restart_sources):
      raise UserError(f"Stage.restart_sources (stage {self.name!r}) must be a list of source "
                      f"names (or ['*']), got {self.restart_sources!r}")
    object.__setattr__(self, "restart_sources", tuple(self.restart_sources))
    check_field_types(self)
    check_range(f"Stage.num_steps (stage {self.name!r})", self.num_steps, low=1, integer=True)
    for name in ("schedule", "optimizer"):
      if not callable(getattr(self, name)):
        raise UserError(f"Stage.{name} (stage {self.name!r}) must be a factory such as "
                        f"@{'warmup_cosine' if name == 'schedule' else 'adamw'} (unevaluated), "
                        f"got {getattr(self, name)!r}")
    if self.transition not in TRANSITIONS:
      raise UserError(f"stage {self.name!r}: unknown transition {self.transition!r}; "
                      f"registered: {sorted(TRANSITIONS)}")
    # Resolve defaults now so every stage object fully describes itself.
    object.__setattr__(self, "model", self.model or ModelConfig())
    object.__setattr__(self, "data", self.data or DataConfig())

  def make_schedule(self):
    """learning rate = f(step within this stage), sized to the stage's length."""
    return self.schedule(self.num_steps)

  def make_optimizer(self):
    """The stage's optimizer with its learning rate injected as state: the train step sets it
    from the trainer's own step (`set_learning_rate`), never from optax's update count, so
    moments kept over a stage boundary re-warm with the new schedule and skipped (non-finite)
    steps cannot shift it."""
    # Only the learning rate is injected; gin still supplies the factory's other arguments.
    optimizer = self.optimizer
    return optax.inject_hyperparams(lambda learning_rate: optimizer(learning_rate))(
        learning_rate=0.0)


def set_learning_rate(opt_state, learning_rate):
  """`opt_state` of `Stage.make_optimizer()` with the learning rate for the coming update."""
  current = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams={
      **opt_state.hyperparams, "learning_rate": jnp.asarray(learning_rate, current.dtype)})


def learning_rate_of(opt_state):
  return opt_state.hyperparams["learning_rate"]


def continue_rows(rows_before: dict[str, int], stage: Stage) -> dict[str, int]:
  """Where each source starts in `stage` (rows already drawn, DataConfig's start_rows): where
  the earlier stages left it (`rows_before`), except the ones the stage restarts."""
  if "*" in stage.restart_sources:
    return {}
  return {name: rows for name, rows in rows_before.items() if name not in stage.restart_sources}


def stage_starts(stages) -> list[int]:
  """Global step at which each stage begins; the run ends at the sum of num_steps."""
  starts, total = [], 0
  for stage in stages:
    starts.append(total)
    total += stage.num_steps
  return starts


# A transition: (params, previous stage, next stage) -> params for the next stage.
Transition = Callable[[Any, Stage, Stage], Any]
TRANSITIONS: dict[str, Transition] = {}


def register_transition(name: str):
  def register(fn: Transition) -> Transition:
    TRANSITIONS[name] = fn
    return fn
  return register


@register_transition("identity")
def identity(params, previous: Stage, following: Stage):
  """Carry the params over unchanged; the model must not change shape."""
  from jaxlm.model import init_params  # Local: only shapes are needed, via eval_shape.
  want = jax.eval_shape(lambda: init_params(following.model, jax.random.key(0)))
  have = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(have) or jax.tree.leaves(want) != jax.tree.leaves(have):
    raise UserError(f"stage {following.name!r} changes the model, which the 'identity' "
                    "transition cannot do; choose a growth transition")
  return params
