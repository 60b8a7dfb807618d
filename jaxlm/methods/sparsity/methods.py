"""Sparse pretraining as stage methods (jaxlm.methods.hooks), named in gin like jaxpruner's
algorithms:

    Stage.methods = [@static_sparsity()]     # static_sparsity.density = 0.5, .score = "random"
    Stage.methods = [@nm_sparsity()]         # 2:4 with SR-STE
    Stage.methods = [@gradual_pruning()]     # cubic, from 25% to 75% of the stage
    Stage.methods = [@rigl()]                # rigl.grow = "random" is SET

Every method keeps its masks (bool, one per selected matrix, named like the param and sharded
like it) in the method state, never in the optimizer state (which a transition may replace), so
they are checkpointed and restored with the run. The loss sees W * mask; after every update the
masked weights are set to exactly zero (SR-STE keeps its dense weights and the loss sees their
N:M projection). A dense stage after a sparse one starts from the masked weights: the
'densify' transition (SPDF) multiplies them by the masks, so the function is unchanged, and the
pruned weights start at zero and train.

Metrics (train/<method>/...): density overall and per matrix, non-zero parameters of the whole
model now and averaged over the stage's steps so far (n_avg, the parameter count of "The Journey
Matters"' law), the bytes the params and the masks hold, and the matmul FLOPs per token the
zeros would save (6 x masked zeros). The ledger's total/flops stays dense-equivalent: dense
CPU and GPU kernels are not faster on unstructured zeros (2:4 needs sparse tensor cores to be).
"""

import math

import gin
import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.methods.hooks import Method
from jaxlm.model import count_params
from jaxlm.model.anatomy import Anatomy, anatomy
from jaxlm.methods.sparsity import selection
from jaxlm.methods.sparsity.distribution import (DISTRIBUTIONS, check_density, kept_counts,
                                         layer_densities)
from jaxlm.methods.sparsity.topk import as_matrix_shape, check_nm, nm_mask, topk_mask
from jaxlm.methods.transition import TransitionContext, transition
from jaxlm.optim.state_layout import map_same_leaves
from jaxlm.tree_names import get_named, replace_named

SCORES = ("magnitude", "random")
GROW = ("gradient", "random")


def masked(params, masks: dict):
  return replace_named(params, {n: get_named(params, n) * m for n, m in masks.items()})


@jax.custom_vjp
def straight_through(weight, mask, decay):
  return weight * mask


def _st_forward(weight, mask, decay):
  return weight * mask, (weight, mask, decay)


def _st_backward(saved, g):
  """The masked weight's gradient reaches every dense weight (straight-through), plus SR-STE's
  decay of the pruned ones: g + decay * (1 - mask) * W (Zhou et al. 2102.04010)."""
  weight, mask, decay = saved
  return g + decay * (1 - mask) * weight, None, None


straight_through.defvjp(_st_forward, _st_backward)


def _matrix_shapes(chosen: dict, parts: Anatomy) -> dict[str, tuple[int, int]]:
  return {n: as_matrix_shape(p.shape, selection.input_axes(parts, n)) for n, p in chosen.items()}


def _counts(chosen: dict, parts: Anatomy, density: float, distribution: str) -> dict[str, int]:
  densities = layer_densities(_matrix_shapes(chosen, parts), density, distribution)
  return kept_counts(densities, {n: math.prod(p.shape) for n, p in chosen.items()})


def _check_choice(label: str, value, choices):
  if value not in choices:
    raise UserError(f"{label}={value!r}; choose one of {list(choices)}")


def sparse_method(name: str, parts: Anatomy, patterns, init_masks, update=None,
                  mode: str = "mask", decay: float = 0.0, regrow: bool = False) -> Method:
  """The frame every algorithm shares, for the model of `parts` (its anatomy): `patterns`
  (None: its block matrices) choose what is masked. `init_masks(chosen params) -> masks`;
  `update(masks, params, grads, step) -> masks` after each update (None: static); `mode`:
  "mask" (the loss sees W * mask, pruned weights get no gradient), "straight_through" (their
  gradient passes, RigL's dense gradient), "srste" (straight-through plus `decay`, dense weights
  kept between steps). `regrow`: weights a mask update adds start at zero with zero Adam
  moments (RigL)."""
  patterns = None if patterns is None else tuple(patterns)

  def init(params, rng):
    del rng  # Random scores come from each algorithm's own seed, folded with the step.
    return {"masks": init_masks(selection.select(params, parts, patterns)),
            "n_avg": jnp.float32(0.0), "steps": jnp.int32(0)}

  def state_axes(param_axes):
    names = selection.select(param_axes, parts, patterns)
    return {"masks": selection.mask_axes(param_axes, names), "n_avg": None, "steps": None}

  def params_for_loss(params, state, step):
    del step
    if mode == "mask":
      return masked(params, state["masks"])
    return replace_named(params, {
        n: straight_through(get_named(params, n), m.astype(jnp.float32), decay)
        for n, m in state["masks"].items()})

  def after_update(state, grads, step):
    own = state.method_state[name]
    masks, params, opt_state = own["masks"], state.params, state.opt_state
    if update is not None:
      new_masks = update(masks, params, grads, step)
      if regrow:  # Grown weights start at zero with zero moments, whatever the step wrote.
        grown = {n: new_masks[n] & ~masks[n] for n in masks}
        params = replace_named(params, {
            n: jnp.where(grown[n], 0.0, get_named(params, n)) for n in masks})
        opt_state = map_same_leaves(
            opt_state, state.params, lambda n, leaf: jnp.where(grown[n], 0.0, leaf),
            f"{name}'s regrow (grown weights start with zero moments)", only=set(masks))
      masks = new_masks
    if mode != "srste":
      params = masked(params, masks)
    zeros = sum(jnp.sum(~m) for m in masks.values())
    nonzero = (count_params(params) - zeros).astype(jnp.float32)
    n_avg = own["n_avg"] + (nonzero - own["n_avg"]) / (own["steps"] + 1).astype(jnp.float32)
    return state.replace(params=params, opt_state=opt_state, method_state={
        **state.method_state, name: {"masks": masks, "n_avg": n_avg, "steps": own["steps"] + 1}})

  def metrics(state):
    own = state.method_state[name]
    masks = own["masks"]
    total = sum(m.size for m in masks.values())
    kept = sum(jnp.sum(m) for m in masks.values())
    out = {"density": kept / total, "nonzero_params": count_params(state.params) - (total - kept),
           "n_avg": own["n_avg"], "mask_bytes": float(sum(m.nbytes for m in masks.values())),
           "param_bytes": float(sum(p.nbytes for p in jax.tree.leaves(state.params))),
           "flops_saved_per_token": 6.0 * (total - kept)}
    out.update({f"density/{n}": jnp.mean(m) for n, m in masks.items()})
    return out

  return Method(name, init=init, state_axes=state_axes, params_for_loss=params_for_loss,
                after_update=after_update, metrics=metrics, masks=lambda own: own["masks"])


def _scores(chosen: dict, score: str, seed: int, step=0) -> dict:
  if score == "magnitude":
    return {n: jnp.abs(p) for n, p in chosen.items()}
  key = jax.random.fold_in(jax.random.key(seed), step)
  return {n: jax.random.uniform(jax.random.fold_in(key, i), p.shape)
          for i, (n, p) in enumerate(chosen.items())}


@gin.configurable
def static_sparsity(density: float = 0.5, distribution: str = "uniform",
                    score: str = "magnitude", patterns=None, seed: int = 0) -> Method:
  """A fixed mask chosen at the start of the stage by |w| or at random, per-matrix density from
  `distribution` (SPDF, Thangarasa et al. 2303.10464, uses a static random mask)."""
  check_density("static_sparsity.density", density)
  _check_choice("static_sparsity.distribution", distribution, DISTRIBUTIONS)
  _check_choice("static_sparsity.score", score, SCORES)

  def for_stage(model, num_steps):
    del num_steps
    parts = anatomy(model)

    def init_masks(chosen):
      counts = _counts(chosen, parts, density, distribution)
      scores = _scores(chosen, score, seed)
      return {n: topk_mask(scores[n], counts[n]) for n in chosen}

    return sparse_method("static_sparsity", parts, patterns, init_masks)
  return Method("static_sparsity", for_stage=for_stage)


@gin.configurable
def nm_sparsity(n: int = 2, m: int = 4, decay: float = 2e-4, patterns=None) -> Method:
  """N:M sparsity along each matrix's input dimension with SR-STE (Zhou et al. 2102.04010): the
  dense weights are kept and trained, the loss sees the N largest of every M, and the pruned
  ones decay by `decay` x W through the straight-through gradient."""
  check_nm("nm_sparsity", n, m, m)

  def for_stage(model, num_steps):
    del num_steps
    parts = anatomy(model)

    def projection(chosen):
      out = {}
      for name, w in chosen.items():
        inputs = selection.input_axes(parts, name)
        check_nm(name, n, m, math.prod(w.shape[i] for i in inputs))
        out[name] = nm_mask(w, n, m, inputs)
      return out

    def update(masks, params, grads, step):  # The projection of the updated dense weights.
      del grads, step
      return projection({name: get_named(params, name) for name in masks})

    return sparse_method("nm_sparsity", parts, patterns, projection, update, mode="srste",
                         decay=decay)
  return Method("nm_sparsity", for_stage=for_stage)


def cubic_density(step, final_density: float, start: int, end: int):
  """Zhu & Gupta's (1710.01878) cubic schedule as a density: 1 before `start`, final from
  `end` on (also where `end` == `start`), 1 - (1 - final) (1 - (1 - p)^3) between, p the
  fraction of [start, end] done."""
  p = jnp.where(step >= end, 1.0, jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0))
  return 1.0 - (1.0 - final_density) * (1.0 - (1.0 - p) ** 3)


def _window(label: str, num_steps: int, start_fraction: float, end_fraction: float):
  start, end = round(start_fraction * num_steps), round(end_fraction * num_steps)
  if not 0.0 <= start_fraction < end_fraction <= 1.0:
    raise UserError(f"{label}: the schedule ends before it starts or outside the stage "
                    f"(start_fraction={start_fraction}, end_fraction={end_fraction}); need "
                    "0 <= start < end <= 1")
  return start, end


@gin.configurable
def gradual_pruning(final_density: float = 0.25, start_fraction: float = 0.25,
                    end_fraction: float = 0.75, update_every: int = 10,
                    distribution: str = "uniform", patterns=None) -> Method:
  """Gradual magnitude pruning, cubic between `start_fraction` and `end_fraction` of the stage
  ("The Journey Matters", 2501.12486: 25% -> 75% is their best schedule); the masks are
  recomputed from the active weights' |w| every `update_every` steps and at the end, so a
  pruned weight never returns. Each matrix follows the schedule to its own final density
  (`distribution`) and holds exactly static sparsity's count for it (`kept_counts`) from the end
  on; an end at or past the stage's last step is that last step, so the stage always gets
  there."""
  check_density("gradual_pruning.final_density", final_density)
  _check_choice("gradual_pruning.distribution", distribution, DISTRIBUTIONS)
  _window("gradual_pruning", 100, start_fraction, end_fraction)

  def for_stage(model, num_steps):
    parts = anatomy(model)
    start, end = _window("gradual_pruning", num_steps, start_fraction, end_fraction)
    # Stage steps are 0 .. num_steps - 1: an end at num_steps (end_fraction=1) would never be
    # reached, nor a start rounded up to it.
    end = min(end, num_steps - 1)
    start = min(start, end)

    def init_masks(chosen):
      return {n: jnp.ones(p.shape, bool) for n, p in chosen.items()}

    def update(masks, params, grads, step):
      del grads
      chosen = {n: get_named(params, n) for n in masks}
      final = layer_densities(_matrix_shapes(chosen, parts), final_density, distribution)
      final_counts = kept_counts(final, {n: w.size for n, w in chosen.items()})
      due = (step >= start) & (step <= end) & (((step - start) % update_every == 0)
                                               | (step == end))

      def prune():
        def count(n, w):  # The schedule in float32, never below the exact final count.
          scheduled = jnp.rint(cubic_density(step, final[n], start, end) * w.size)
          return jnp.where(step >= end, final_counts[n],
                           jnp.maximum(final_counts[n], scheduled.astype(jnp.int32)))
        counts = {n: count(n, w) for n, w in chosen.items()}
        # Among the active weights only: a pruned weight is zero, but so may be an active one,
        # and a tie at zero must not bring the pruned one back.
        return {n: topk_mask(jnp.abs(w), counts[n], eligible=masks[n]) for n, w in chosen.items()}
      return jax.lax.cond(due, prune, lambda: masks)

    return sparse_method("gradual_pruning", parts, patterns, init_masks, update)
  return Method("gradual_pruning", for_stage=for_stage)


def drop_and_grow(mask, weight, growth, fraction):
  """One matrix's RigL/SET mask update: drop floor(`fraction` x active) of the active weights
  with the smallest |`weight`| and grow as many with the largest `growth` score (non-negative)
  among all weights not kept. The count of active weights is exactly unchanged: the drop keeps
  active - drop of `active` eligible weights, and at least `drop` weights are not kept.

  The just-dropped weights are eligible to grow again, as in RigL (Evci et al. 1911.11134,
  Algorithm 1 grows from the weights outside theta minus I_drop; the authors' code lowers the
  grow score of the kept weights only). Growing from the weights inactive *before* the drop
  instead loses weights whenever fewer than `drop` are inactive: every update of a dense
  matrix (ERK makes small ones dense) or of one above 1 / (1 + fraction) density. A dropped
  weight grown back is in both masks, so `sparse_method` keeps its value and moments (the
  authors' default, reinit_when_same=False)."""
  active = jnp.sum(mask, dtype=jnp.int32)
  drop = jnp.floor(fraction * active).astype(jnp.int32)
  kept = topk_mask(jnp.abs(weight), active - drop, eligible=mask)
  return kept | topk_mask(growth, drop, eligible=~kept)


@gin.configurable
def rigl(density: float = 0.2, distribution: str = "erk", update_every: int = 100,
         drop_fraction: float = 0.3, end_fraction: float = 0.75, grow: str = "gradient",
         patterns=None, seed: int = 0) -> Method:
  """RigL (Evci et al. 1911.11134): a random mask of `density` (per matrix by `distribution`);
  every `update_every` steps until `end_fraction` of the stage, drop the smallest-|w| fraction
  of each matrix's active weights (`drop_fraction`, cosine-decayed to 0 at the end) and grow as
  many with the largest |gradient| (grow="random": SET, Mocanu et al. 1707.04780) among the
  weights not kept, the ones just dropped included (`drop_and_grow`); newly grown weights start
  at zero with their Adam moments reset. Each matrix keeps exactly its initial number of active
  weights through every update, whatever its density: a matrix ERK makes dense stays dense."""
  check_density("rigl.density", density)
  _check_choice("rigl.distribution", distribution, DISTRIBUTIONS)
  _check_choice("rigl.grow", grow, GROW)
  if not 0.0 <= drop_fraction <= 1.0:
    raise UserError(f"rigl.drop_fraction={drop_fraction!r} must be in [0, 1]")

  def for_stage(model, num_steps):
    parts = anatomy(model)
    _, end = _window("rigl", num_steps, 0.0, end_fraction)

    def init_masks(chosen):
      counts = _counts(chosen, parts, density, distribution)
      scores = _scores(chosen, "random", seed)
      return {n: topk_mask(scores[n], counts[n]) for n in chosen}

    def update(masks, params, grads, step):
      due = (step > 0) & (step < end) & (step % update_every == 0)

      def regrow():
        fraction = drop_fraction / 2 * (1 + jnp.cos(jnp.pi * step / end))
        chosen = {n: get_named(params, n) for n in masks}
        growth = (_scores(chosen, "random", seed + 1, step) if grow == "random" else
                  {n: jnp.abs(get_named(grads, n)) for n in masks})
        return {n: drop_and_grow(mask, chosen[n], growth[n], fraction)
                for n, mask in masks.items()}
      return jax.lax.cond(due, regrow, lambda: masks)

    return sparse_method("rigl", parts, patterns, init_masks, update, mode="straight_through",
                         regrow=True)
  return Method("rigl", for_stage=for_stage)


@gin.configurable
@transition()
def densify(state, ctx: TransitionContext):
  """SPDF's sparse -> dense hand-over (Thangarasa et al. 2303.10464): the params times every
  sparse method's masks (a no-op where they are zero already, the N:M projection for SR-STE),
  so the dense stage computes the same function and its pruned weights start at zero. The
  masks are those the previous stage's methods declare (`Method.masks`)."""
  params = state.params
  for method in ctx.previous.methods:
    if method.masks is not None:
      params = masked(params, method.masks(state.method_state[method.name]))
  return state.replace(params=params)
