"""GaLore and Muon as gin factories (jaxlm/optim/matrix_optimizers.py): what they act on, in the
view the anatomy gives each matrix; GaLore's update in its projector's span, Adam at full rank
where the gradient's basis is the coordinate one, a refresh exactly every T steps (across a
checkpoint restore too); Muon's one momentum per matrix and its orthogonalised update; one-line
refusals; both trained from gin (slow)."""

import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quick_run_args
from jaxlm import train
from jaxlm.checkpointing.checkpoint import Checkpointer, RunRecord
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.anatomy import anatomy
from jaxlm.optim.matrix_optimizers import galore, matrix_axes, matrix_shape, muon
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.state_layout import state_layout
from jaxlm.training.stages import Stage
from jaxlm.training.train_step import abstract_state
from jaxlm.tree_names import flatten_names, replace_named
from helpers import raw_state

# 4 heads of 8, 2 kv heads: key and value are 32 x 16 matrices, so no rank above 16.
MODEL = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_seq_len=64)
# Block 1 a mixture of 4 experts [expert, embed, mlp]; block 0 dense.
MOE = dataclasses.replace(MODEL, moe_layers=(1,), num_experts=4, experts_per_token=2)
LR = 1e-2
# float32 round-off of an SVD and a few Adam steps on updates of size ~LR: far below any real
# difference (a wrong side, axis or scale moves updates by ~LR).
ATOL = 1e-7


def _matrix(part, x):
  """`x` (of `part`'s shape) as its [inputs, outputs] matrix (one per expert first if routed)."""
  inputs, outputs = matrix_axes(part)
  batch = tuple(d for d in range(x.ndim) if d not in inputs + outputs)
  rows, cols = matrix_shape(part)
  return x.transpose(batch + inputs + outputs).reshape(*[x.shape[d] for d in batch], rows, cols)


def _random(tree, seed, scale=1.0):
  """Gaussian leaves of `tree`'s shapes (numpy's generator: nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32),
                      tree)


@functools.lru_cache
def _params(model):
  """Random params of `model`'s shapes (their values only meet weight decay)."""
  return _random(jax.eval_shape(lambda: init_params(model, jax.random.key(0))), 0, 0.02)


def _grads(params, seed):
  return _random(params, seed + 1)


def _galore_state(opt_state):
  """GaLore's own state in chain(clip, multi_transform(...)) (inject_hyperparams' too)."""
  opt_state = getattr(opt_state, "inner_state", opt_state)
  return opt_state[1].inner_states["galore"].inner_state[0]


def _run(tx, params, grads_list, state=None):
  """The updates and states of `tx` over a list of gradient trees, from `state` (or a fresh
  one)."""
  update, results = jax.jit(tx.update), []
  state = tx.init(params) if state is None else state
  for grads in grads_list:
    updates, state = update(grads, state, params)
    results.append((updates, state))
  return results


def test_galore_update_lies_in_the_span_of_the_current_projector():
  """rank 4 < every side: each matrix's update U (its [inputs, outputs] view) satisfies
  P P^T U = U (or U P P^T, on the side optax projects) to 1e-5 of its size, between refreshes
  too, while the gradient is far from that span."""
  params = _params(MODEL)
  tx = galore(LR, rank=4, update_proj_gap=2, weight_decay=0.0, model=MODEL)
  checked = 0
  for step, (updates, state) in enumerate(_run(tx, params, [_grads(params, s)
                                                            for s in range(3)])):
    projectors = flatten_names(_galore_state(state).projector)
    for part in anatomy(MODEL).block_matmuls:
      u, g = _matrix(part, part.get(updates)), _matrix(part, part.get(_grads(params, step)))
      p = projectors[part.name]
      in_span = (lambda x: p @ (p.T @ x)) if p.shape[0] == u.shape[0] else (lambda x: x @ p @ p.T)
      assert float(jnp.max(jnp.abs(in_span(u) - u))) <= 1e-5 * float(jnp.max(jnp.abs(u)))
      assert float(jnp.max(jnp.abs(in_span(g) - g))) > 0.3 * float(jnp.max(jnp.abs(g)))
      checked += 1
  assert checked == 3 * 14
  assert set(projectors) == {p.name for p in anatomy(MODEL).block_matmuls}


def _diagonal(rows, cols, step):
  """A gradient whose singular vectors are coordinate vectors, the same ones in the same order
  at every step (its values move by less than their spacing): distinct values with fixed signs
  on a diagonal."""
  fixed, moving = np.random.default_rng(0), np.random.default_rng(step)
  size = min(rows, cols)
  values = fixed.permutation(np.linspace(0.5, 2.0, size)) * fixed.choice([-1, 1], size)
  values = values * (1 + 0.3 * moving.uniform(-1, 1, size) / size)  # Keeps their order.
  return jnp.zeros((rows, cols)).at[np.arange(size), np.arange(size)].set(values)


def test_galore_at_full_rank_is_adam_in_the_gradients_singular_basis():
  """rank = the smaller side (mlp/up is 32 x 64), scale 1: GaLore runs Adam in the gradient's
  singular basis. Where that basis is the coordinate one, its updates equal AdamW's (weight
  decay included) over 4 steps with refreshes every 2, to ATOL; for a random gradient the first
  update is sign(G V) V^T, which is not Adam's sign(G): Adam's per-coordinate normalisation is
  not rotation invariant, so no tolerance makes GaLore equal Adam in general."""
  params = _params(MODEL)
  up = anatomy(MODEL)["layer_0/mlp/up"]
  full = galore(LR, rank=32, update_proj_gap=2, scale=1.0, matrices=("layer_0/mlp/up",),
                model=MODEL)
  grads = [replace_named(_grads(params, s), {up.name: _diagonal(32, 64, 10 + s)})
           for s in range(4)]
  for (ours, _), (adams, _) in zip(_run(full, params, grads), _run(adamw(LR), params, grads)):
    np.testing.assert_allclose(up.get(ours), up.get(adams), rtol=0, atol=ATOL)
    jax.tree.map(np.testing.assert_array_equal,  # AdamW's partition: the same program.
                 replace_named(ours, {up.name: 0.0}), replace_named(adams, {up.name: 0.0}))

  g = up.get(_grads(params, 0))
  ours = up.get(_run(full, params, [_grads(params, 0)])[0][0])
  v = np.linalg.svd(np.asarray(g, np.float64))[2].T  # Right side: 32 < 64.
  in_basis = g @ v[:, :32]
  expected = -LR * (in_basis / (np.abs(in_basis) + 1e-8)) @ v[:, :32].T - LR * 0.1 * up.get(params)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3 * LR)  # float32 SVD: ~2e-4.
  assert float(jnp.max(jnp.abs(ours - up.get(_run(adamw(LR), params,
                                                  [_grads(params, 0)])[0][0])))) > 0.5 * LR


def test_galore_projector_refreshes_exactly_every_T_steps_also_across_a_restore(tmp_path):
  """T = 3: the projectors change on updates 1, 4 and 7 and on no other. A run restored from
  a checkpoint saved after update 5 (mid-period) refreshes on update 7 too, bitwise as the run
  that never stopped."""
  params = _params(MODEL)
  tx = Stage(num_steps=8, model=MODEL,
             optimizer=functools.partial(galore, rank=4, update_proj_gap=3)).make_optimizer()
  grads = [_grads(params, s) for s in range(8)]
  states = [state for _, state in _run(tx, params, grads)]
  projectors = [flatten_names(_galore_state(s).projector) for s in [tx.init(params), *states]]
  changed = lambda run: [k for k in range(1, len(run)) if all(
      not np.array_equal(run[k][name], run[k - 1][name]) for name in run[k])]
  unchanged = lambda run: [k for k in range(1, len(run)) if all(
      np.array_equal(run[k][name], run[k - 1][name]) for name in run[k])]
  assert changed(projectors) == [1, 4, 7] and unchanged(projectors) == [2, 3, 5, 6, 8]

  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(5, {"opt_state": states[4]}, RunRecord(step=5, gin_config=""), force=True)
  checkpointer.close()
  restored = Checkpointer(str(tmp_path)).restore_state(
      5, {"opt_state": jax.eval_shape(tx.init, params)})["opt_state"]
  resumed = [restored] + [s for _, s in _run(tx, params, grads[5:], restored)]
  for ours, theirs in zip(resumed, states[4:], strict=True):
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  # After updates 5 (restored), 6, 7 and 8: the one change is on update 7.
  assert changed([flatten_names(_galore_state(s).projector) for s in resumed]) == [2]


def test_muon_keeps_one_momentum_per_hidden_matrix_and_adams_two_moments_on_the_rest():
  stage = Stage(num_steps=4, model=MODEL, optimizer=muon)
  state = abstract_state(stage)
  layout = state_layout(state.opt_state, state.params, stage.make_optimizer())
  same = {}
  for leaf in layout:
    assert leaf.param is None or leaf.relation == "same", leaf
    if leaf.param:
      same[leaf.param] = same.get(leaf.param, 0) + 1
  matrices = {p.name for p in anatomy(MODEL).block_matmuls}
  assert len(matrices) == 14 and {n for n, k in same.items() if k == 1} == matrices
  assert {n for n, k in same.items() if k == 2} == set(flatten_names(state.params)) - matrices
  # Counts and the Newton-Schulz coefficients are tied to no param.
  assert {leaf.relation for leaf in layout if leaf.param is None} == {"scalar", "other"}


def _newton_schulz(g):
  """Jordan's five quintic Newton-Schulz steps (the coefficients optax uses), in float64."""
  wide = g if g.shape[0] <= g.shape[1] else g.T
  x = wide / (np.linalg.norm(wide) + 1e-8)
  for _ in range(5):
    a = x @ x.T
    x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
  return x if g.shape[0] <= g.shape[1] else x.T


def test_muon_orthogonalises_each_matrix_in_the_view_its_anatomy_reads():
  """First update, no decay or clipping: Muon's momentum is a multiple of the gradient, so each
  matrix's update is -lr x sqrt(max(inputs, outputs)) x 0.2 x NS5(G) of its [inputs, outputs]
  view (attention kernels [embed, heads, head_dim] as embed x heads*head_dim, out the other
  way round, each MoE expert on its own), to 1e-5 of its size."""
  params = _params(MOE)
  grads = _grads(params, 0)
  tx = muon(LR, weight_decay=0.0, grad_clip_norm=None, model=MOE)
  updates = _run(tx, params, [grads])[0][0]
  parts = anatomy(MOE).block_matmuls
  assert sum(p.role.routed for p in parts) == 3 and len(parts) == 14
  for part in parts:
    g = np.asarray(_matrix(part, part.get(grads)), np.float64)
    rows, cols = matrix_shape(part)
    expected = -LR * 0.2 * math.sqrt(max(rows, cols)) * np.stack(
        [_newton_schulz(m) for m in g.reshape(-1, rows, cols)])
    np.testing.assert_allclose(_matrix(part, part.get(updates)).reshape(expected.shape), expected,
                               rtol=0, atol=1e-5 * np.max(np.abs(expected)))
  router = anatomy(MOE)["layer_1/mlp/router"]  # Not a block matmul: AdamW's first step.
  np.testing.assert_allclose(router.get(updates), -LR * jnp.sign(router.get(grads)), rtol=1e-5)


@pytest.mark.parametrize("factory, settings, model, message", [
    (galore, {"rank": 17}, MODEL, r"galore.rank = 17 is larger than the smaller side of "
     r"'layer_0/attention/key' \[32, 2, 8\] \(a 32 x 16 matrix\); set galore.rank <= 16"),
    (galore, {"rank": 0}, MODEL, r"galore.rank must be an integer in \[1, inf\), got 0"),
    (galore, {"rank": 4.0}, MODEL, r"galore.rank must be an integer"),
    (galore, {"update_proj_gap": 0}, MODEL, r"galore.update_proj_gap must be an integer in \[1"),
    (galore, {"scale": 0.0}, MODEL, r"galore.scale must be a number in \(0, inf\)"),
    (galore, {"b2": 1.0}, MODEL, r"galore.b2 must be a number in \[0, 1\)"),
    (galore, {"rank": 4}, MOE, r"galore cannot project the MoE expert weights 'layer_1/mlp/down'"
     r" \[4, 64, 32\].*galore.matrices"),
    (galore, {"rank": 4, "matrices": ("layer_0/mlp_norm/scale",)}, MODEL,
     r"galore.matrices selects 'layer_0/mlp_norm/scale' \[32\], a norm that is not a matrix"),
    (galore, {"rank": 4, "matrices": ("layer_0/mlp/upp",)}, MODEL,
     r"galore.matrices pattern 'layer_0/mlp/upp' matches no param"),
    (galore, {"rank": 4}, None, r"galore needs the model"),
    (muon, {"beta": 1.0}, MODEL, r"muon.beta must be a number in \[0, 1\)"),
    (muon, {"ns_steps": 0}, MODEL, r"muon.ns_steps must be an integer in \[1"),
    (muon, {"consistent_rms": -0.2}, MODEL, r"muon.consistent_rms must be a number in \(0"),
    (muon, {"weight_decay": -1.0}, MODEL, r"muon.weight_decay must be a number in \[0"),
    (muon, {"matrices": ("layer_.*/attention/(query|key|value|out)", "embed/embedding",
                         "final_norm/scale")}, MODEL,
     r"muon.matrices selects 'final_norm/scale' \[32\], a norm that is not a matrix"),
])
def test_bad_settings_are_refused_with_one_line(factory, settings, model, message):
  with pytest.raises(UserError) as error:
    factory(LR, model=model, **settings)
  line = str(error.value).splitlines()[0]  # gin adds its "In call to" line; the CLI drops it.
  assert re.search(message, line), line


def test_a_rank_too_large_is_refused_when_the_stage_is_built():
  stage = Stage(num_steps=4, model=MODEL, optimizer=functools.partial(galore, rank=32))
  with pytest.raises(UserError, match=r"set galore.rank <= 16"):
    abstract_state(stage)


GIN = """
run.stages = [@galore/Stage(), @muon/Stage()]
galore/Stage.optimizer = @galore
muon/Stage.optimizer = @muon
galore/Stage.num_steps = 4
muon/Stage.num_steps = 4
galore.rank = 4
galore.update_proj_gap = 2
ModelConfig.d_model = 32
ModelConfig.num_layers = 2
ModelConfig.mlp_dim = 64
ModelConfig.num_kv_heads = 2
"""


@pytest.mark.slow  # ~25 s (two train-step compiles); test_gin_files builds the gin blocks.
def test_galore_then_muon_train_from_gin(tmp_path, small_text_file):
  """`Stage.optimizer = @galore` and `@muon` in one two-stage run: the loss falls, each stage's
  checkpoint holds its optimizer's state."""
  (tmp_path / "run.gin").write_text(GIN, encoding="utf-8")
  model_dir = tmp_path / "run"
  assert train.main(quick_run_args(
      model_dir, small_text_file, f"--gin_file={tmp_path / 'run.gin'}",
      "--gin.EvalConfig.every=1000", "--gin.EvalConfig.baseline=False",
      "--gin.TrainerConfig.sample_tokens=0", "--gin.TrainerConfig.log_every=1",
      "--gin.TrainerConfig.checkpoint_every=4", "--gin.TrainerConfig.progress='log'")) == 0
  with open(model_dir / "metrics.jsonl", encoding="utf-8") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1
  galore_leaves = flatten_names(raw_state(model_dir, 4)["opt_state"])
  assert any("/galore/" in n and "/projector/layer_1/attention/out" in n for n in galore_leaves)
  muon_leaves = flatten_names(raw_state(model_dir, 8)["opt_state"])
  assert any("/muon/" in n and "/mu/layer_1/mlp/down" in n for n in muon_leaves)
