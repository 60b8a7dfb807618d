"""A run is a list of stages.

A stage is (model config, data, optimizer + schedule, number of steps, transitions, methods).
Its transitions map the previous stage's final train state to this stage's first one; growth,
sparsity and vocabulary expansion define their own (methods/transition.py: each one gin
configurable, `large/Stage.transition = [@grow_width]`; the default is @identity).

A transition is a pure function of the whole TrainState (step, params, opt_state, method_state)
and runs inside one `jax.jit` whose out_shardings are the next stage's. Several compose in list
order (`Stage.transition = [@grow_width, @grow_depth]`). After them, unless the stage keeps the
optimizer state, it is initialised afresh for the new params; each of the stage's methods that
has no state yet is initialised; states of methods the stage does not list are dropped. The
result must have exactly the next stage's shapes (`check_transition_result` names the leaf that
does not). A plain pretraining run is one stage whose transitions are never called.
"""

import dataclasses
import inspect
from typing import Any, Callable

import gin
import jax.numpy as jnp
import optax

from jaxlm.checkpointing.restore import source_model
from jaxlm.data.pipeline import DataConfig
from jaxlm.data.tokenizers import resolve_tokenizer
from jaxlm.errors import UserError
from jaxlm.methods.hooks import Method, init_method_state
from jaxlm.methods.transition import Transition, TransitionContext, identity, transition_name
from jaxlm.model import ModelConfig
from jaxlm.tree_names import first_difference, shapes_of
from jaxlm.validation import check_field_types, check_range
from jaxlm.optim.optimizers import adamw, build as build_optimizer
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
  transition: Transition | tuple[Transition, ...] = identity  # One, or a list applied in order.
  methods: tuple[Method, ...] = ()  # Step hooks (methods/hooks.py), applied in order.
  keep_optimizer_state: bool = False  # Carry Adam moments over the transition (same shapes only).
  restore_from: Any = None  # A restore.RestoreConfig: start this stage from another run.
  # Sources this stage reads from their first row again ("*": all of them); every other source
  # continues where the earlier stages left it.
  restart_sources: tuple[str, ...] = ()
  # The gin scope the stage was built in (["long"] for @long/Stage()): its schedule, optimizer,
  # data and the transitions into it are built inside it, so `long/warmup_cosine.x` reaches
  # stage "long" without binding long/Stage.schedule.
  gin_scope: tuple[str, ...] = dataclasses.field(init=False, default=(), compare=False,
                                                 repr=False)

  def __post_init__(self):
    object.__setattr__(self, "gin_scope", tuple(gin.current_scope()))
    if self.name is None:
      object.__setattr__(self, "name", "/".join(self.gin_scope) or "pretrain")
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
    transitions = (tuple(self.transition) if isinstance(self.transition, (list, tuple))
                   else (self.transition,))
    for fn in transitions:
      if isinstance(fn, str):
        raise UserError(f"Stage.transition (stage {self.name!r}) names {fn!r}; give the "
                        f"transition itself, unevaluated: Stage.transition = [@{fn}]")
      if not getattr(fn, "jaxlm_transition", False):
        raise UserError(f"Stage.transition (stage {self.name!r}) must be transitions such as "
                        f"[@grow_width] (unevaluated), got {fn!r}")
    if not transitions:
      raise UserError(f"Stage.transition (stage {self.name!r}) is empty; leave it unset for "
                      "@identity")
    object.__setattr__(self, "transition", transitions)
    methods = tuple(self.methods)
    names = [m.name for m in methods if isinstance(m, Method)]
    if len(names) != len(methods) or len(set(names)) != len(names):
      raise UserError(f"Stage.methods (stage {self.name!r}) must be Methods with distinct names "
                      f"(e.g. [@nm_sparsity()]), got {self.methods!r}")
    # Resolve defaults now so every stage object fully describes itself.
    object.__setattr__(self, "model", self.model or ModelConfig())
    object.__setattr__(self, "data", self.data or DataConfig())
    if methods and self.model.parameterization != "dense":
      raise UserError(f"stage {self.name!r}: its methods {names} read the model's matrices, "
                      f"which are {self.model.parameterization} factors here; run them in a "
                      "later dense stage (Stage.transition = [@sltrain_to_dense])")
    # A method that needs the model's anatomy or the stage's length (a schedule over the stage)
    # is made for them here.
    methods = tuple(m.for_stage(self.model, self.num_steps) if m.for_stage else m
                    for m in methods)
    object.__setattr__(self, "methods", methods)
    for fn in transitions:
      if fn.needs_method and fn.needs_method not in [m.name for m in methods]:
        raise UserError(f"stage {self.name!r}: the {transition_name(fn)!r} transition needs the "
                        f"{fn.needs_method} method in the stage (Stage.methods = "
                        f"[@{fn.needs_method}()])")

  @property
  def transition_names(self) -> list[str]:
    return [transition_name(fn) for fn in self.transition]

  def method(self, name: str):
    """The stage's method called `name` (a transition's declared `needs_method`)."""
    return next(m for m in self.methods if m.name == name)

  def scope(self):
    """`with stage.scope():` gin bindings scoped to the stage's scope apply to what is built."""
    return gin.config_scope(list(self.gin_scope))

  def make_schedule(self, previous_lr: float = 0.0):
    """learning rate = f(step within this stage), sized to the stage's length; `previous_lr`
    (where the previous stage ended) reaches factories that take it, for re-warming."""
    with self.scope():
      if "previous_lr" in inspect.signature(self.schedule).parameters:
        return self.schedule(self.num_steps, previous_lr=previous_lr)
      return self.schedule(self.num_steps)

  def make_optimizer(self):
    """The stage's optimizer with its learning rate injected as state: the train step sets it
    from the trainer's own step (`set_learning_rate`), never from optax's update count, so
    moments kept over a stage boundary re-warm with the new schedule and skipped (non-finite)
    steps cannot shift it."""
    # Only the learning rate is injected; gin still supplies the factory's other arguments.
    def build(learning_rate):  # Called whenever optax traces init or update.
      with self.scope():
        return build_optimizer(self.optimizer, learning_rate, self.model)
    return optax.inject_hyperparams(build)(learning_rate=0.0)


def set_learning_rate(opt_state, learning_rate):
  """`opt_state` of `Stage.make_optimizer()` with the learning rate for the coming update."""
  current = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams={
      **opt_state.hyperparams, "learning_rate": jnp.asarray(learning_rate, current.dtype)})


def learning_rate_of(opt_state):
  return opt_state.hyperparams["learning_rate"]


def stage_schedules(stages, restored_lr: Callable | None = None) -> list:
  """Each stage's schedule, given the learning rate the stage before it ended at (its schedule
  after its last update), so that a stage can re-warm from there. A stage that restores another
  run re-warms from where that run was instead: `restored_lr(stage)` (restore.
  source_learning_rate), None when the source does not say (a Hugging Face model)."""
  schedules, previous_lr = [], 0.0
  for stage in stages:
    source_lr = restored_lr(stage) if restored_lr and stage.restore_from is not None else None
    if source_lr is not None:
      previous_lr = source_lr
    schedules.append(stage.make_schedule(previous_lr))
    previous_lr = float(schedules[-1](stage.num_steps))
  return schedules


def continue_rows(rows_before: dict[str, int], stage: Stage) -> dict[str, int]:
  """Where each source starts in `stage` (rows already drawn, DataConfig's start_rows): where
  the earlier stages left it (`rows_before`), except the ones the stage restarts."""
  if "*" in stage.restart_sources:
    return {}
  return {name: rows for name, rows in rows_before.items() if name not in stage.restart_sources}


def configured_stages() -> list[Stage]:
  """The stages the parsed gin config binds to run.stages, built as `run` would get them."""
  return [ref.scoped_configurable_fn() for ref in gin.query_parameter("run.stages")]


def stage_starts(stages) -> list[int]:
  """Global step at which each stage begins; the run ends at the sum of num_steps."""
  starts, total = [], 0
  for stage in stages:
    starts.append(total)
    total += stage.num_steps
  return starts


def restored_stage(stage: Stage) -> Stage | None:
  """What a first stage's transitions start from when it restores another run (upcycling or
  growing a checkpoint trained elsewhere, with no stage to load it): a stage holding the
  source's model and tokenizer (RestoreConfig.model, .tokenizer) with this stage's optimizer.
  None when the stage restores nothing or has no transitions (the restore then fills the
  stage's own model)."""
  config = stage.restore_from
  if config is None or stage.transition == (identity,):
    return None
  data = stage.data
  if config.tokenizer is not None:
    data = dataclasses.replace(data, tokenizer=config.tokenizer)
  source = dataclasses.replace(
      stage, name=f"{stage.name} (restored)", model=source_model(config, stage.model),
      data=data, transition=identity, methods=(), restore_from=None)
  object.__setattr__(source, "gin_scope", stage.gin_scope)  # The stage's optimizer bindings.
  return source


def transition_context(previous: Stage, following: Stage, rng, shardings=None):
  return TransitionContext(previous, following, rng, resolve_tokenizer(previous.data.tokenizer),
                           resolve_tokenizer(following.data.tokenizer), shardings)


def check_hand_over_from_factors(ctx: TransitionContext) -> None:
  """After an SLTrain stage a transition that reads matrices has none to read: the hand-over is
  `sltrain_to_dense` alone (or identity to another SLTrain stage)."""
  names = ctx.following.transition_names
  if (ctx.previous.model.parameterization != "dense" and names != ["identity"]
      and names != ["sltrain_to_dense"]):
    raise UserError(f"stage {ctx.following.name!r}: its transitions {names} follow a stage whose "
                    f"matrices are {ctx.previous.model.parameterization} factors; make the model "
                    "dense first, alone in its stage's hand-over (Stage.transition = "
                    "[@sltrain_to_dense]), and transform it in a later stage")


def hand_over(state, ctx: TransitionContext):
  """The previous stage's final state -> the next stage's first (run under jit): its transitions
  in order, a fresh optimizer state unless kept, method states initialised or dropped."""
  following = ctx.following
  check_hand_over_from_factors(ctx)
  with following.scope():  # `grow/grow_depth.order = ...` reaches the transitions into "grow".
    for fn in following.transition:
      state = fn(state, ctx)
  if not following.keep_optimizer_state:
    state = state.replace(opt_state=following.make_optimizer().init(state.params))
  return state.replace(method_state=init_method_state(
      following.methods, state.params, ctx.rng, existing=state.method_state))


def check_transition_result(result, expected, ctx: TransitionContext) -> None:
  """`result` (hand_over's, abstract) has exactly the next stage's shapes, else one line naming
  the first leaf that differs."""
  following, names = ctx.following, " then ".join(ctx.following.transition_names)
  difference = first_difference(shapes_of(result), shapes_of(expected),
                                f"after the {names!r} transition", f"by stage {following.name!r}")
  if difference is None:
    return
  if following.keep_optimizer_state and not difference.startswith("'params/"):
    raise UserError(f"stage {following.name!r}: keep_optimizer_state needs the optimizer state "
                    f"the transition gives to fit the stage, but {difference}")
  if following.transition == (identity,):
    raise UserError(f"stage {following.name!r} changes the model, which the 'identity' "
                    f"transition cannot do: {difference}; choose a growth transition")
  raise UserError(f"stage {following.name!r}: {difference}; choose a transition that produces "
                  "this model, or change the model")
