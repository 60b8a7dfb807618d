"""Optimizers: gin-configurable factories `f(schedule) -> optax.GradientTransformation`.

A factory that takes a `model` keyword is also given the stage's ModelConfig (`build`), so it
can read the model's anatomy (which params are the embedding, which axes a matrix reads).
"""

import inspect
import re

import gin
import jax
import optax

from jaxlm.errors import UserError
from jaxlm.model.anatomy import anatomy
from jaxlm.model.sparse_plus_low_rank import SPARSE_VALUES
from jaxlm.tree_names import path_name
from jaxlm.validation import check_range


def decay_matrices_only(params):
  """Weight decay on matrices (ndim >= 2) and on SLTrain's sparse entries (a matrix's, kept
  flat): norms' gains and biases stay undecayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 or getattr(path[-1], "key", None) == SPARSE_VALUES, params)


def check_adam(name: str, b1, b2, eps, weight_decay, grad_clip_norm) -> None:
  """The range checks every Adam-family factory shares, each naming `name`'s binding."""
  for key, value in (("b1", b1), ("b2", b2)):
    check_range(f"{name}.{key}", value, low=0, high=1, high_open=True)
  check_range(f"{name}.eps", eps, low=0, low_open=True)
  check_range(f"{name}.weight_decay", weight_decay, low=0)
  check_range(f"{name}.grad_clip_norm", grad_clip_norm, low=0, low_open=True, optional=True)


def clipped(grad_clip_norm: float | None, tx) -> optax.GradientTransformation:
  """`tx` after global-norm gradient clipping over every param (none if `grad_clip_norm` is
  None)."""
  clip = optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm else optax.identity()
  return optax.chain(clip, tx)


@gin.configurable
def adamw(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, grad_clip_norm: float | None = 1.0):
  """AdamW (Loshchilov & Hutter, 1711.05101) after global-norm gradient clipping."""
  check_adam("adamw", b1, b2, eps, weight_decay, grad_clip_norm)
  return clipped(grad_clip_norm, optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                                             weight_decay=weight_decay, mask=decay_matrices_only))


def build(factory, schedule, model=None) -> optax.GradientTransformation:
  """factory(schedule), with `model=` too when the factory takes it."""
  if model is not None and "model" in inspect.signature(factory).parameters:
    return factory(schedule, model=model)
  return factory(schedule)


@gin.configurable
def train_only(schedule: optax.Schedule, optimizer=adamw,
               trainable: tuple[str, ...] | None = None, model=None):
  """`optimizer` on the params whose name ("layer_0/mlp/up") fully matches a `trainable`
  pattern (None: the params with a token axis, as the model's anatomy lists them: the embedding
  and an untied head); every other param is frozen (zero update, no optimizer state). The
  embeddings-only first stage of vocabulary expansion (Bilingual Adaptation, arXiv:2407.12869):

      embeddings/Stage.optimizer = @train_only
      train_only.optimizer = @adamw
  """
  if trainable is None:
    if model is None:
      raise UserError("train_only.trainable is unset and no model was given to find the "
                      "embeddings in; use it as a Stage.optimizer or set train_only.trainable")
    trainable = [re.escape(p.name) for p in anatomy(model) if "vocab" in p.axes]
  patterns = [re.compile(p) for p in trainable]

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if any(p.fullmatch(path_name(path)) for p in patterns)
        else "freeze", params)
  return optax.multi_transform({"train": build(optimizer, schedule, model),
                                "freeze": optax.set_to_zero()}, labels)
