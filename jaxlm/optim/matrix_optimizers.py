"""GaLore and Muon on the blocks' matrices, AdamW on every other param: optax's own optimizers
(`optax.contrib.galore`, `optax.contrib.muon`), told by the model's anatomy what to act on.

    Stage.optimizer = @galore          # or include 'gin/optim/galore.gin'
    Stage.optimizer = @muon            # or include 'gin/optim/muon.gin'

Both act on the blocks' matrices (`anatomy(model).block_matmuls`: attention query, key, value
and out, the MLP's matrices; `matrices` patterns select others), each seen as one
[input, output] matrix: the axes its Part reads against the rest, so an attention kernel
[embed, heads, head_dim] is a d_model x (heads * head_dim) matrix and `out` [heads, head_dim,
embed] a (heads * head_dim) x d_model one. The embeddings, the head, the norms (and an MoE
router) train with plain AdamW (decay on matrices only, as `adamw`), as both methods' authors
do; one `optax.multi_transform` holds both states, after one global-norm clip over every param.

GaLore's projection side. The paper (2403.03507) and its authors' galore_torch
(`GaLoreProjector.project`: G Q^T when rows >= cols, P^T G otherwise) project a gradient's
smaller side to the rank r, so the moments keep its larger side (2 x max(m, n) x r numbers) and
the projector is min(m, n) x r. optax projects the larger side (`use_left = m >= n`: a max(m, n)
x r projector, moments of min(m, n) x r). We keep optax's side: optax chooses it from the
matrix's shape alone, so no dimension numbers flip it and only a fork of optax's GaLore could;
at each refresh both sides reconstruct the same best rank-r approximation of the gradient (U_r
U_r^T G = G V_r V_r^T); and it keeps fewer numbers (r (max + 2 min) against r (min + 2 max)).
What differs: between refreshes optax's updates stay in an r-dimensional subspace of the larger
side's space rather than of the smaller side's, and at r = min(m, n) optax's projector is not
square, so the projection is lossless at a refresh only (the authors' side is lossless at every
step). Either way Adam runs in the gradient's singular basis, so even at full rank GaLore equals
Adam only where that basis is the coordinate one (tests/test_matrix_optimizers.py). Moments are
kept, not reset, when the projector refreshes (every `update_proj_gap` of optax's updates), as
in galore_torch; weight decay acts on the full weights, decoupled (optax.contrib.galore adds it
after projecting back).
"""

import math
import re

import gin
import jax
import optax

from jaxlm.errors import UserError
from jaxlm.model.anatomy import Part, anatomy
from jaxlm.optim.optimizers import check_adam, clipped, decay_matrices_only
from jaxlm.tree_names import path_name
from jaxlm.validation import check_range


def matrix_axes(part: Part) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(input dims, output dims) of a param seen as a matrix: the axes it reads against the rest,
  less an MoE expert weight's leading expert axis (Role.routed: one matrix per expert)."""
  inputs = part.input_dims
  batch = (0,) if part.role.routed else ()
  return inputs, tuple(d for d in range(len(part.shape)) if d not in inputs + batch)


def matrix_shape(part: Part) -> tuple[int, int]:
  """(rows, columns) of one of its matrices: inputs x outputs."""
  return tuple(math.prod(part.shape[d] for d in dims) for dims in matrix_axes(part))


def _selected_matrices(name: str, model, patterns) -> list[Part]:
  """The params `name` acts on: those whose name ("layer_0/mlp/up") fully matches one of
  `patterns`, or the blocks' matrices if None; each must be a matrix."""
  if model is None:
    raise UserError(f"{name} needs the model to find its matrices; use it as a Stage.optimizer "
                    "(the stage gives it its ModelConfig)")
  parts = anatomy(model)
  factored = [part.name for part in parts if part.stored != "dense"]
  if factored:
    raise UserError(f"{name} acts on dense matrices, but this model stores {factored[0]} and "
                    f"{len(factored) - 1} more as SLTrain factors (ModelConfig.parameterization); "
                    f"train it with adamw, or make it dense first (the sltrain_to_dense "
                    "transition)")
  if patterns is None:
    return parts.block_matmuls
  compiled = [re.compile(p) for p in patterns]
  for pattern in compiled:
    if not any(pattern.fullmatch(part.name) for part in parts):
      raise UserError(f"{name}.matrices pattern {pattern.pattern!r} matches no param (they are "
                      f"named like {parts.block_matmuls[0].name!r}); fix the binding "
                      f"{name}.matrices")
  chosen = [part for part in parts if any(p.fullmatch(part.name) for p in compiled)]
  for part in chosen:
    if not all(matrix_axes(part)):
      raise UserError(f"{name}.matrices selects {part.name!r} {list(part.shape)}, a {part.kind} "
                      f"that is not a matrix (it reads {list(part.reads) or 'no axes'}); select "
                      f"matrices only with {name}.matrices")
  return chosen


def _with_adamw(name: str, tx, parts: list[Part], schedule, b1, b2, eps, weight_decay,
               grad_clip_norm):
  """`tx` on `parts`, AdamW on every other param, in one state, after global-norm clipping."""
  names = {part.name for part in parts}
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: name if path_name(path) in names else "adamw", params)
  rest = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=decay_matrices_only)
  return clipped(grad_clip_norm, optax.multi_transform({name: tx, "adamw": rest}, labels))


def _per_param(values: dict):
  """params -> values[name] at each leaf: optax hands a partition its params with the others
  masked out, so the tree is built from the one it is given."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: values[path_name(path)], params)


def _check_rank(rank: int, parts: list[Part]) -> None:
  for part in parts:
    if part.role.routed:
      raise UserError(f"galore cannot project the MoE expert weights {part.name!r} "
                      f"{list(part.shape)}: optax's GaLore has no batch axis, so it would project "
                      "every expert in one subspace; use @muon or @adamw, or leave the experts to "
                      "AdamW by naming the other matrices in galore.matrices")
    rows, cols = matrix_shape(part)
    if rank > min(rows, cols):
      raise UserError(f"galore.rank = {rank} is larger than the smaller side of {part.name!r} "
                      f"{list(part.shape)} (a {rows} x {cols} matrix); set galore.rank <= "
                      f"{min(rows, cols)}")


@gin.configurable
def galore(schedule: optax.Schedule, rank: int = 128, update_proj_gap: int = 200,
           scale: float = 0.25, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
           weight_decay: float = 0.1, grad_clip_norm: float | None = 1.0,
           matrices: tuple[str, ...] | None = None, model=None):
  """GaLore (Zhao et al., 2403.03507): each matrix's gradient projected on its top-`rank`
  singular vectors (an SVD every `update_proj_gap` steps, T), Adam's moments kept in that
  space, the update projected back times `scale`; AdamW on the other params. The side it
  projects: the module docstring."""
  check_range("galore.rank", rank, low=1, integer=True)
  check_range("galore.update_proj_gap", update_proj_gap, low=1, integer=True)
  check_range("galore.scale", scale, low=0, low_open=True)
  check_adam("galore", b1, b2, eps, weight_decay, grad_clip_norm)
  parts = _selected_matrices("galore", model, matrices)
  _check_rank(rank, parts)
  dims = _per_param({part.name: optax.contrib.GaLoreDimensionNumbers(*matrix_axes(part))
                    for part in parts})
  tx = optax.contrib.galore(schedule, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                            base_optimizer=optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                            weight_decay=weight_decay, weight_dimension_numbers=dims)
  return _with_adamw("galore", tx, parts, schedule, b1, b2, eps, weight_decay, grad_clip_norm)


@gin.configurable
def muon(schedule: optax.Schedule, beta: float = 0.95, ns_steps: int = 5, nesterov: bool = True,
         consistent_rms: float | None = 0.2, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.1, grad_clip_norm: float | None = 1.0,
         matrices: tuple[str, ...] | None = None, model=None):
  """Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): each matrix's (Nesterov)
  momentum orthogonalised by `ns_steps` Newton-Schulz iterations, an MoE layer's experts one by
  one (the expert axis a batch axis); AdamW on the other params. `consistent_rms` scales the
  update to that RMS (Liu et al., 2502.16982) so one schedule and weight decay serve both
  groups; None: Jordan's sqrt(max(1, outputs / inputs))."""
  check_range("muon.beta", beta, low=0, high=1, high_open=True)
  check_range("muon.ns_steps", ns_steps, low=1, integer=True)
  check_range("muon.consistent_rms", consistent_rms, low=0, low_open=True, optional=True)
  check_adam("muon", b1, b2, eps, weight_decay, grad_clip_norm)
  parts = _selected_matrices("muon", model, matrices)
  dims = _per_param({part.name: optax.contrib.MuonDimensionNumbers(*matrix_axes(part))
                    for part in parts})
  tx = optax.contrib.muon(schedule, ns_steps=ns_steps, beta=beta, eps=eps,
                          weight_decay=weight_decay, nesterov=nesterov,
                          muon_weight_dimension_numbers=dims, consistent_rms=consistent_rms)
  return _with_adamw("muon", tx, parts, schedule, b1, b2, eps, weight_decay, grad_clip_norm)
