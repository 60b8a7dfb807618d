"""The optimizer state's layout: for every leaf, the param it belongs to and how it relates to it.

    layout = state_layout(opt_state, params, tx)     # [StateLeaf], in the state's leaf order
    layout[3].param, layout[3].relation              # "layer_0/mlp/up", "same"

Relations:
  "same"       the param's shape, index for index (Adam's mu and nu, Muon's momentum): what an
               operation on params (growth, vocabulary expansion, a sparse reset) may apply too;
  "factored"   fewer numbers along some of the param's axes (Adafactor's row and column
               statistics);
  "projected"  another basis, e.g. low rank (GaLore's projector and projected moments);
  "scalar"     a count or a hyperparameter, tied to no param;
  "other"      tied to no param but not a scalar (Muon's Newton-Schulz coefficients).

A leaf belongs to the param whose name is the longest run of its path (optax keeps a state's
param-shaped trees under the params' own keys: "0/mu/layer_0/mlp/up"). Shape equality alone can
mislead: GaLore with a rank equal to one of a matrix's sides keeps a projector and moments of the
matrix's own shape, and a projector [embed, rank] of an attention kernel [embed, heads, head_dim]
looks like a moment that dropped axes. Given the optimizer, its state is also built (shapes only)
for params twice as large along every axis: a leaf is "same", or "factored", only if it follows
its param there too (a rank does not double).

Every operation that rewrites optimizer state goes through `map_same_leaves`: it applies to the
"same" leaves and refuses, with one line naming the leaf and the operation, any other leaf tied to
a param, instead of acting on a leaf of another shape.
"""

import dataclasses
import math

import jax

from jaxlm.errors import UserError
from jaxlm.tree_names import flatten_names, path_name


@dataclasses.dataclass(frozen=True)
class StateLeaf:
  name: str  # The leaf's path in the optimizer state: "0/mu/layer_0/mlp/up".
  param: str | None  # The param it belongs to: "layer_0/mlp/up"; None for counts.
  relation: str  # "same", "factored", "projected", "scalar" or "other".
  shape: tuple[int, ...]


def owner(path: tuple[str, ...], param_names) -> str | None:
  """The param whose name is the longest run of `path` ending latest (a state keeps its leaves
  below or beside their param's path: `mu/mlp/up`, `mlp/up/projector`)."""
  for length in range(len(path), 0, -1):
    for start in range(len(path) - length, -1, -1):
      name = "/".join(path[start:start + length])
      if name in param_names:
        return name
  return None


def _aligned(shape, param_shape) -> bool:
  """Every dimension of `shape` above 1 matches a later dimension of the param, in order: a
  moment that dropped or collapsed axes (factored), not one in another basis."""
  next_dim = 0
  for size in shape:
    if size == 1:
      continue
    match = next((d for d in range(next_dim, len(param_shape)) if param_shape[d] == size), None)
    if match is None:
      return False
    next_dim = match + 1
  return True


def _relation(shape, param_shape, doubled) -> str:
  """`doubled`: (the leaf's shape, its param's shape) for params twice as large, or None."""
  if param_shape is None:
    return "scalar" if len(shape) == 0 else "other"
  follows = lambda relates: doubled is None or relates(*doubled)
  if shape == param_shape and follows(lambda a, b: a == b):
    return "same"
  if (_aligned(shape, param_shape) and math.prod(shape) < math.prod(param_shape) and
      follows(_aligned)):
    return "factored"
  return "projected"


def _doubled_state_shapes(tx, params) -> list[tuple] | None:
  """The state's leaf shapes for params twice as large on every axis (None if the optimizer
  cannot be built for them)."""
  doubled = jax.tree.map(lambda p: jax.ShapeDtypeStruct(tuple(2 * d for d in p.shape), p.dtype),
                         params)
  try:
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(jax.eval_shape(tx.init, doubled))]
  except Exception:  # pylint: disable=broad-except  (an optimizer's own shape checks)
    return None


def state_layout(opt_state, params, tx=None) -> list[StateLeaf]:
  """Every leaf of `opt_state` (arrays or ShapeDtypeStructs), tagged; see the module docstring.
  `tx`: the optimizer that made the state (sharper "same" tags)."""
  param_shapes = {name: tuple(leaf.shape) for name, leaf in flatten_names(params).items()}
  doubled_params = {name: tuple(2 * d for d in shape) for name, shape in param_shapes.items()}
  doubled = None if tx is None else _doubled_state_shapes(tx, params)
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  if doubled is not None and len(doubled) != len(leaves):
    doubled = None  # Another structure at that size: no evidence either way.
  layout = []
  for i, (path, leaf) in enumerate(leaves):
    name = path_name(path)
    shape = tuple(leaf.shape)
    param = owner(tuple(name.split("/")), param_shapes)
    grown = None if doubled is None or param is None else (doubled[i], doubled_params[param])
    layout.append(StateLeaf(name, param, _relation(shape, param_shapes.get(param), grown),
                            shape))
  return layout


def _refuse_other_relations(leaves: list[StateLeaf], operation: str) -> None:
  for leaf in leaves:
    if leaf.relation != "same":
      raise UserError(f"{operation} cannot carry the optimizer state leaf {leaf.name!r} "
                      f"{list(leaf.shape)} ({leaf.relation}, of the param {leaf.param!r}); start "
                      "the stage with a fresh optimizer state (Stage.keep_optimizer_state = "
                      "False) or use an optimizer whose state has the params' shapes")


def map_same_leaves(opt_state, params, fn, operation: str, tx=None, only=None):
  """`opt_state` with fn(param name, leaf) applied to every leaf of its param's shape (of the
  params named in `only`, if given); a leaf tied to one of those params in any other way is
  refused with one line naming it and `operation`."""
  layout = state_layout(opt_state, params, tx)
  chosen = lambda leaf: leaf.param is not None and (only is None or leaf.param in only)
  _refuse_other_relations([leaf for leaf in layout if chosen(leaf)], operation)
  values, treedef = jax.tree.flatten(opt_state)
  return treedef.unflatten([fn(leaf.param, value) if chosen(leaf) and leaf.relation == "same"
                            else value for leaf, value in zip(layout, values)])


def map_same_trees(opt_state, params, fn, operation: str, tx=None):
  """`opt_state` with fn(tree) applied to every subtree that holds one leaf of each param's
  shape under the params' own structure (Adam's mu and nu), for operations that change the
  tree itself (depth growth adds blocks). Refuses like `map_same_leaves`, and refuses a "same"
  leaf outside such a subtree (a moment kept for some params only)."""
  layout = state_layout(opt_state, params, tx)
  _refuse_other_relations([leaf for leaf in layout if leaf.param is not None], operation)
  treedef = jax.tree.structure(params)
  shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]

  def is_params_shaped(x):
    return (isinstance(x, dict) and jax.tree.structure(x) == treedef and
            [tuple(leaf.shape) for leaf in jax.tree.leaves(x)] == shapes)
  whole = [path_name(path) + "/" for path, x in jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=is_params_shaped)[0] if is_params_shaped(x)]
  for leaf in layout:
    if leaf.relation == "same" and not any(leaf.name.startswith(prefix) for prefix in whole):
      raise UserError(f"{operation} carries whole param-shaped trees of optimizer state, but the "
                      f"leaf {leaf.name!r} (of {leaf.param!r}) is kept for some params only; "
                      "start the stage with a fresh optimizer state "
                      "(Stage.keep_optimizer_state = False)")
  return jax.tree.map(lambda x: fn(x) if is_params_shaped(x) else x, opt_state,
                      is_leaf=is_params_shaped)
