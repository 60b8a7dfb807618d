"""The train state and the jitted, sharded steps: init, train (with gradient accumulation and
the stage's method hooks, methods/hooks.py) and eval. Shardings come from the model's logical
axes and the run's rule set (parallel.py)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.methods.hooks import MethodHooks, init_method_state
from jaxlm.model import init_params, logical_axes, token_losses
from jaxlm.model.loss import training_losses
from jaxlm.training.stages import Stage, learning_rate_of, set_learning_rate


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any  # {method name: what it keeps between steps}; {} without methods.


def init_state(stage: Stage, rng) -> TrainState:
  params_rng, methods_rng = jax.random.split(rng)
  params = init_params(stage.model, params_rng)
  return TrainState(jnp.zeros((), jnp.int32), params, stage.make_optimizer().init(params),
                    init_method_state(stage.methods, params, methods_rng))


def abstract_state(stage: Stage) -> TrainState:
  return jax.eval_shape(lambda: init_state(stage, jax.random.key(0)))


def state_shardings(stage: Stage, mesh, rules) -> TrainState:
  """Where every leaf of the train state lives: params by their logical axes, optimizer state
  like its params, method state by the axes its method declares, counters replicated."""
  abstract = abstract_state(stage)
  param_axes = logical_axes(stage.model)
  params = parallel.logical_shardings(abstract.params, param_axes, mesh, rules)
  opt_state = parallel.optimizer_state_shardings(stage.make_optimizer(), abstract.opt_state,
                                                 params, mesh, abstract_params=abstract.params)
  replicated = NamedSharding(mesh, PartitionSpec())
  method_state = {}
  for method in stage.methods:
    if method.name not in abstract.method_state:
      continue
    leaves = abstract.method_state[method.name]
    axes = None if method.state_axes is None else method.state_axes(param_axes)
    method_state[method.name] = parallel.logical_shardings(
        leaves, _expand_axes(axes, leaves), mesh, rules)
  return TrainState(replicated, params, opt_state, method_state)


def _expand_axes(axes, leaves):
  """`axes` (a prefix of the `leaves` tree) with each entry applied to every leaf below it;
  None entries replicate (a method keeps e.g. a small operator unsharded)."""
  is_entry = lambda x: x is None or isinstance(x, PartitionSpec)
  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: spec or PartitionSpec(), sub),
                      axes, leaves, is_leaf=is_entry)


def sharded_abstract_state(stage: Stage, mesh, rules) -> TrainState:
  """ShapeDtypeStructs with their shardings: the target a checkpoint is restored into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state(stage), state_shardings(stage, mesh, rules))


def sharded_init(stage: Stage, shardings: TrainState, rng) -> TrainState:
  """Initialise directly into the shardings: no host ever holds the full model."""
  return jax.jit(lambda r: init_state(stage, r), out_shardings=shardings)(rng)


def _split_microbatches(batch, num_microbatches: int):
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...: strided, so every
  micro-batch keeps rows on every data-parallel device (no resharding per micro-batch)."""
  def split(x):
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch", "length"))
  return jax.tree.map(split, batch)


def scalar_metrics(prefix: str, metrics: dict) -> dict:
  """{prefix/name: scalar}: an array metric (an MoE layer's expert load [E]) gives one scalar
  per entry, prefix/name/i."""
  flat = {}
  for name, value in metrics.items():
    if value.ndim == 0:
      flat[f"{prefix}/{name}"] = value
    else:
      flat.update({f"{prefix}/{name}/{i}": v for i, v in enumerate(value.reshape(-1))})
  return flat


def make_train_step(stage: Stage, shardings: TrainState, batch_sharding,
                    num_microbatches: int = 1, stage_start: int = 0, schedule=None):
  """jit(state, batch) -> (state, metrics), donating the old state. With k micro-batches the
  summed gradient is divided by the total loss weight once, so the update equals the one for
  the whole batch (up to float summation order). The step counter advances even when the
  update is skipped, so data order and schedules stay tied to the step. The learning rate is
  the stage's schedule at (state.step - stage_start), set into the optimizer state each step.

  The model's own auxiliary losses (what its modules sow into "losses", e.g. an MoE layer's
  balancing loss; logged as train/aux/model/<name>) are added to the loss; what it sows into
  "metrics" is logged as train/model/<layer>/<module>/<name> (an MoE layer's expert load). The stage's methods
  (methods/hooks.py) transform the params the loss sees, add auxiliary losses of their own, and
  transform the state after the update. Auxiliary losses are each micro-batch's, averaged over
  micro-batches; a dense model with no methods traces none of that."""
  cfg, tx = stage.model, stage.make_optimizer()
  schedule = schedule or stage.make_schedule()  # The trainer's re-warms from the last stage.
  hooks = MethodHooks(stage.methods)

  def objective(params, method_state, step, batch, total_weight):
    """Summed weighted cross-entropy (+ total_weight x aux / k, so that dividing the summed
    gradient by total_weight gives the mean cross-entropy + the mean auxiliary loss)."""
    params = hooks.params_for_loss(params, method_state, step)
    ce_BL, extras = training_losses(params, cfg, batch, hooks.wants_intermediates)
    loss_sum = jnp.sum(ce_BL * batch["weights"])
    aux = {f"model/{name}": value for name, value in extras.losses.items()}
    if hooks.wants_intermediates:
      aux.update(hooks.aux_losses(params, method_state, extras.intermediates))
    if not aux:
      return loss_sum, (loss_sum, {}, extras.metrics)
    scale = total_weight / num_microbatches
    return loss_sum + scale * sum(aux.values()), (loss_sum, aux, extras.metrics)

  grad_fn = jax.grad(objective, has_aux=True)

  def summed_grads(params, method_state, step, batch, total_weight):
    """(summed loss, mean aux losses, mean model metrics, summed gradient)."""
    if num_microbatches == 1:
      grads, (loss_sum, aux, model_metrics) = grad_fn(params, method_state, step, batch,
                                                      total_weight)
      return loss_sum, aux, model_metrics, grads

    def accumulate(carry, microbatch):
      grads, (loss_sum, aux, model_metrics) = grad_fn(params, method_state, step, microbatch,
                                                      total_weight)
      return jax.tree.map(jnp.add, carry, (loss_sum, aux, model_metrics, grads)), None

    shapes = jax.eval_shape(lambda: grad_fn(params, method_state, step, batch, total_weight))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (*shapes[1], shapes[0]))
    (loss_sum, aux, model_metrics, grads), _ = jax.lax.scan(
        accumulate, zeros, _split_microbatches(batch, num_microbatches))
    mean = lambda tree: jax.tree.map(lambda a: a / num_microbatches, tree)
    return loss_sum, mean(aux), mean(model_metrics), grads

  def train_step(state: TrainState, batch):
    stage_step = state.step - stage_start
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    loss_sum, aux, model_metrics, grads = summed_grads(state.params, state.method_state,
                                                       stage_step, batch, total_weight)
    grads = jax.tree.map(lambda g: g / total_weight, grads)
    with jax.named_scope("optimizer"):  # Names the update's ops in profiles (tools/profile_step.py).
      opt_state = set_learning_rate(state.opt_state, schedule(stage_step))
      updates, opt_state = tx.update(grads, opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    new = hooks.after_update(state.replace(step=state.step + 1, params=params,
                                           opt_state=opt_state), grads, stage_step)
    loss, grad_norm = loss_sum / total_weight, optax.tree.norm(grads)
    # A non-finite loss, gradient or update leaves params, optimizer and method state as they
    # were: the step is skipped (and counted by the trainer), never applied.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    for value in aux.values():
      finite &= jnp.isfinite(value)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": learning_rate_of(opt_state),  # As applied.
               "train/nonfinite": 1.0 - finite.astype(jnp.float32),
               **{f"train/aux/{name}": value for name, value in aux.items()},
               **scalar_metrics("train/model", model_metrics)}
    new = new.replace(params=keep(new.params, state.params),
                      opt_state=keep(new.opt_state, state.opt_state),
                      method_state=keep(new.method_state, state.method_state))
    return new, {**metrics, **hooks.metrics(new)}

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_params_for_eval(stage: Stage, stage_start: int = 0):
  """state -> the params the model is evaluated (and sampled) with: the stage's params_for_loss
  hooks applied, or the params themselves when it has none."""
  hooks = MethodHooks(stage.methods)
  if not any(m.params_for_loss for m in stage.methods):
    return lambda state: state.params
  return jax.jit(lambda state: hooks.params_for_loss(state.params, state.method_state,
                                                     state.step - stage_start))


def make_eval_step(stage: Stage, param_shardings, batch_sharding):
  """jit(params, batch) -> (summed target loss in nats, number of targets)."""
  cfg = stage.model

  def eval_step(params, batch):
    ce_BL = token_losses(params, cfg, batch)
    return jnp.sum(ce_BL * batch["weights"]), jnp.sum(batch["weights"])

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=replicated)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
