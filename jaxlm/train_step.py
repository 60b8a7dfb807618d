"""The train state and the jitted, sharded steps: init, train (with gradient accumulation) and
eval. Shardings come from the model's logical axes and the run's rule set (parallel.py)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.evaluate import token_losses
from jaxlm.model import init_params, logical_axes
from jaxlm.stages import Stage, learning_rate_of, set_learning_rate


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(stage: Stage, rng) -> TrainState:
  params = init_params(stage.model, rng)
  return TrainState(jnp.zeros((), jnp.int32), params, stage.make_optimizer().init(params))


def abstract_state(stage: Stage) -> TrainState:
  return jax.eval_shape(lambda: init_state(stage, jax.random.key(0)))


def state_shardings(stage: Stage, mesh, rules) -> TrainState:
  """Where every leaf of the train state lives: params by their logical axes, optimizer moments
  like their params, counters replicated."""
  abstract = abstract_state(stage)
  params = parallel.logical_shardings(abstract.params, logical_axes(stage.model), mesh, rules)
  opt_state = parallel.optimizer_state_shardings(stage.make_optimizer(), abstract.opt_state,
                                                 params, mesh)
  return TrainState(NamedSharding(mesh, PartitionSpec()), params, opt_state)


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


def make_train_step(stage: Stage, shardings: TrainState, batch_sharding,
                    num_microbatches: int = 1, stage_start: int = 0):
  """jit(state, batch) -> (state, metrics), donating the old state. With k micro-batches the
  summed gradient is divided by the total loss weight once, so the update equals the one for
  the whole batch (up to float summation order). The step counter advances even when the
  update is skipped, so data order and schedules stay tied to the step. The learning rate is
  the stage's schedule at (state.step - stage_start), set into the optimizer state each step."""
  cfg, tx, schedule = stage.model, stage.make_optimizer(), stage.make_schedule()

  def weighted_loss_sum(params, batch):
    ce_BL = token_losses(params, cfg, batch)
    return jnp.sum(ce_BL * batch["weights"]), jnp.sum(batch["weights"])

  grad_fn = jax.value_and_grad(weighted_loss_sum, has_aux=True)

  def summed_grads(params, batch):
    if num_microbatches == 1:
      (loss_sum, weight_sum), grads = grad_fn(params, batch)
      return loss_sum, weight_sum, grads

    def accumulate(carry, microbatch):
      (loss_sum, weight_sum), grads = grad_fn(params, microbatch)
      total_loss, total_weight, total_grads = carry
      return (total_loss + loss_sum, total_weight + weight_sum,
              jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    carry, _ = jax.lax.scan(accumulate, zeros, _split_microbatches(batch, num_microbatches))
    return carry

  def train_step(state: TrainState, batch):
    loss_sum, weight_sum, grads = summed_grads(state.params, batch)
    weight_sum = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / weight_sum, grads)
    opt_state = set_learning_rate(state.opt_state, schedule(state.step - stage_start))
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss, grad_norm = loss_sum / weight_sum, optax.tree.norm(grads)
    # A non-finite loss, gradient or update leaves params and optimizer state as they were: the
    # step is skipped (and counted by the trainer), never applied.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": learning_rate_of(opt_state),  # As applied.
               "train/nonfinite": 1.0 - finite.astype(jnp.float32)}
    return TrainState(state.step + 1, keep(params, state.params),
                      keep(opt_state, state.opt_state)), metrics

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


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
