"""SLTrain's hand-over to a dense model: every sparse-plus-low-rank (or low-rank only) weight
(Han et al. 2406.02214; jaxlm/model/sparse_plus_low_rank.py) becomes the dense matrix it forms,
so that a model pretrained with SLTrain can be continued densely, evaluated, pruned, grown or
exported to Hugging Face format like any other.

    dense/Stage.model = @dense/ModelConfig()
    dense/ModelConfig.parameterization = 'dense'
    dense/Stage.transition = [@sltrain_to_dense]
"""

import dataclasses

import gin
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.methods.transition import TransitionContext, kept_moments, transition
from jaxlm.model import ModelConfig
from jaxlm.model.anatomy import anatomy
from jaxlm.model.config import RUN_FIELDS, SLTRAIN_FIELDS
from jaxlm.model.sparse_plus_low_rank import sltrain_matrix


def check_sltrain_to_dense(sltrain: ModelConfig, dense: ModelConfig) -> None:
  if sltrain.parameterization == "dense":
    raise UserError("sltrain_to_dense: the previous stage's model is not an SLTrain model "
                    f"(parameterization={sltrain.parameterization!r}); drop the transition")
  if dense.parameterization != "dense":
    raise UserError("sltrain_to_dense: bind the next stage's ModelConfig.parameterization = "
                    "'dense'")
  ignored = {"parameterization", *SLTRAIN_FIELDS, *RUN_FIELDS}
  changed = [f.name for f in dataclasses.fields(sltrain)
             if f.name not in ignored and getattr(dense, f.name) != getattr(sltrain, f.name)]
  if changed:
    raise UserError(f"sltrain_to_dense makes the weights dense only, but the next stage's model "
                    f"also changes {changed}; change those in a later stage")


def dense_params(tree, sltrain: ModelConfig, moments: bool = False):
  """`sltrain`'s param-shaped `tree` with every SLTrain weight replaced by the matrix it forms
  (`moments`: the tree is an optimizer moment, so the dense matrices' moments start at zero:
  a moment of the factors is not one of the matrix)."""
  out = {}
  for part in anatomy(sltrain):
    value = part.stored_in(tree)
    if part.stored != "dense":
      value = (jnp.zeros(part.shape, value["values"].dtype) if moments
               else sltrain_matrix(sltrain, part.name, value).dense())
    node = out
    for key in part.path[:-1]:
      node = node.setdefault(key, {})
    node[part.path[-1]] = value
  return out


@gin.configurable
@transition()
def sltrain_to_dense(state, ctx: TransitionContext):
  """W = (alpha / rank) * lowrank_in @ lowrank_out + S for every SLTrain weight; the function is
  unchanged (to float32 rounding of the formed matrix, the same one the SLTrain step used)."""
  sltrain, dense = ctx.previous.model, ctx.following.model
  check_sltrain_to_dense(sltrain, dense)
  return state.replace(
      params=dense_params(state.params, sltrain),
      opt_state=kept_moments(state, ctx, lambda tree: dense_params(tree, sltrain, True),
                             "sltrain_to_dense"))
