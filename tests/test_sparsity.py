"""Sparse pretraining (jaxlm.methods.sparsity): exact density and N:M structure after every step, masked
weights exactly zero after 100 updates, ERK's formula (dense at density 1), RigL's and SET's
exact per-matrix counts (ERK-dense and near-dense matrices included) and reset moments, gradual
pruning's exact final counts at any schedule window, exact top-k, densification preserving the
function, masks sharded with their params; bad input is one line each."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import parallel
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, forward
from jaxlm.model.anatomy import anatomy
from jaxlm.methods.sparsity import selection
from jaxlm.methods.sparsity.distribution import kept_counts, layer_densities
from jaxlm.methods.sparsity.methods import (cubic_density, densify, gradual_pruning, nm_sparsity, rigl,
                                    static_sparsity)
from jaxlm.methods.sparsity.topk import as_matrix_shape, nm_mask, topk_mask
from jaxlm.methods.transition import TransitionContext
from jaxlm.training.train_step import init_state, make_train_step, sharded_init, state_shardings
from jaxlm.tree_names import get_named
from conftest import REPO_ROOT
from helpers import (cli_run_args, killed_run_resumes_bitwise, mesh_and_rules, mesh_flags,
                     mesh_result, random_batch, run_mesh_worker, run_to_the_end, tiny_stage)


def _train(stage, steps, collect=None):
  """`steps` updates of `stage` on one fixed batch; `collect(state, step)` after each."""
  mesh, rules = mesh_and_rules()
  with jax.set_mesh(mesh):
    shardings = state_shardings(stage, mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(0))
    if collect:
      collect(state, 0)
    train_step = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))
    batch = random_batch(stage)
    for i in range(steps):
      state, metrics = train_step(state, batch)
      if collect:
        collect(state, i + 1)
  return state, metrics


def _masks(state, name):
  return state.method_state[name]["masks"]


def test_topk_mask_is_exact_with_ties_and_eligibility():
  scores = jnp.abs(jax.random.normal(jax.random.key(0), (32, 24)))
  for k in (1, 77, 768):
    mask = topk_mask(scores, k)
    want = np.zeros(scores.size, bool)
    want[np.argsort(-np.asarray(scores).ravel(), kind="stable")[:k]] = True
    np.testing.assert_array_equal(np.asarray(mask).ravel(), want)
  tied = jnp.round(scores * 2) / 2
  mask = topk_mask(tied, 100)
  assert int(mask.sum()) == 100 and float(tied[mask].min()) >= float(tied[~mask].max())
  eligible = jax.random.bernoulli(jax.random.key(1), 0.5, scores.shape)
  mask = topk_mask(scores, 50, eligible)
  assert int(mask.sum()) == 50 and not bool(jnp.any(mask & ~eligible))
  assert int(topk_mask(scores, 0, eligible).sum()) == 0


def test_nm_mask_keeps_the_n_largest_of_every_m_along_the_input():
  w = jax.random.normal(jax.random.key(2), (8, 3, 4))  # [heads, head_dim, embed]: input (0, 1).
  mask = nm_mask(w, 2, 4, (0, 1))
  groups = np.asarray(mask).reshape(6, 4, 4)
  assert (groups.sum(axis=1) == 2).all()
  flat = np.abs(np.asarray(w)).reshape(6, 4, 4)
  assert (np.where(groups, flat, np.inf).min(axis=1) >= np.where(groups, -np.inf, flat).max(
      axis=1)).all()


def test_erk_matches_its_formula_and_re_solves_dense_layers():
  shapes = {"a": (64, 64), "b": (64, 256), "c": (4, 8)}
  densities = layer_densities(shapes, 0.3, "erk")
  assert densities["c"] == 1.0  # eps * (4 + 8) / 32 would exceed 1: made dense, re-solved.
  sizes = {n: a * b for n, (a, b) in shapes.items()}
  eps = (0.3 * sum(sizes.values()) - sizes["c"]) / sum(
      (a + b) / (a * b) * sizes[n] for n, (a, b) in shapes.items() if n != "c")
  for name in ("a", "b"):
    a, b = shapes[name]
    assert densities[name] == pytest.approx(eps * (a + b) / (a * b), rel=1e-12)
  kept = sum(densities[n] * sizes[n] for n in shapes)
  assert kept == pytest.approx(0.3 * sum(sizes.values()), rel=1e-12)
  assert layer_densities(shapes, 0.3, "uniform") == {n: 0.3 for n in shapes}


def test_static_masks_hold_exact_density_and_zeros_after_100_updates(small_text_file):
  method = static_sparsity(density=0.3, distribution="erk", score="random")
  stage = tiny_stage(small_text_file, 100, methods=(method,))
  densities = []

  def check(state, step):
    masks = _masks(state, "static_sparsity")
    densities.append({n: int(m.sum()) for n, m in masks.items()})
    if step:
      for name, mask in masks.items():
        assert not np.any(np.asarray(get_named(state.params, name))[~np.asarray(mask)])
  state, metrics = _train(stage, 100, check)
  assert all(d == densities[0] for d in densities)  # Static: the same counts every step.
  masks = _masks(state, "static_sparsity")
  total = sum(m.size for m in masks.values())
  assert metrics["train/static_sparsity/density"] == pytest.approx(0.3, abs=1e-3)
  assert sum(densities[0].values()) / total == pytest.approx(0.3, abs=1e-3)
  zeros = total - sum(densities[0].values())
  assert metrics["train/static_sparsity/flops_saved_per_token"] == 6.0 * zeros
  assert metrics["train/static_sparsity/mask_bytes"] == total
  assert metrics["train/static_sparsity/param_bytes"] == 4 * sum(
      x.size for x in jax.tree.leaves(state.params))


def test_nm_sparsity_is_exactly_n_of_m_after_every_step_with_sr_ste(small_text_file):
  stage = tiny_stage(small_text_file, 6, methods=(nm_sparsity(n=2, m=4),))

  def check(state, step):
    for name, mask in _masks(state, "nm_sparsity").items():
      w = get_named(state.params, name)
      inputs = selection.input_axes(anatomy(stage.model), name)
      np.testing.assert_array_equal(mask, nm_mask(w, 2, 4, inputs))  # Of the current weights.
      moved = np.moveaxis(np.asarray(mask), inputs, range(len(inputs)))
      groups = moved.reshape(-1, 4, math.prod(moved.shape[len(inputs):]))
      assert (groups.sum(axis=1) == 2).all(), (name, step)
  state, metrics = _train(stage, 6, check)
  assert metrics["train/nm_sparsity/density"] == 0.5
  # SR-STE keeps the dense weights: the pruned ones are not zero.
  w = get_named(state.params, "layer_0/mlp/up")
  assert np.count_nonzero(w) == w.size


def test_sr_ste_gradient_passes_and_decays_the_pruned_weights():
  from jaxlm.methods.sparsity.methods import straight_through  # pylint: disable=import-outside-toplevel
  w = jnp.array([1.0, -2.0, 3.0, 0.5])
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  grad = jax.grad(lambda x: jnp.sum(straight_through(x, mask, 0.1) * jnp.arange(4.0)))(w)
  np.testing.assert_allclose(grad, jnp.arange(4.0) + 0.1 * (1 - mask) * w)


def test_gradual_pruning_follows_the_cubic_schedule(small_text_file):
  stage = tiny_stage(small_text_file, 40, methods=(gradual_pruning(
      final_density=0.25, start_fraction=0.25, end_fraction=0.75, update_every=5),))
  seen = {}
  _train(stage, 40, lambda state, step: seen.update({step: {
      n: int(m.sum()) for n, m in _masks(state, "gradual_pruning").items()}}))
  name = "layer_0/mlp/up"
  size = 64 * 192
  assert seen[10][name] == size  # The update at step 10 (stage step 9) is before the start.
  for stage_step in (10, 15, 20, 25, 30):  # Each update's count, logged after that step.
    want = max(1, int(np.rint(float(cubic_density(stage_step, 0.25, 10, 30)) * size)))
    assert seen[stage_step + 1][name] == want, stage_step
  assert seen[40][name] == size // 4


def test_rigl_keeps_each_density_and_resets_the_moments_of_grown_weights(small_text_file):
  stage = tiny_stage(small_text_file, 12, methods=(rigl(density=0.2, update_every=4,
                                                    end_fraction=1.0),))
  history = {}
  _train(stage, 9, lambda state, step: history.update({step: jax.device_get(state)}))
  before, after = _masks(history[4], "rigl"), _masks(history[5], "rigl")  # Update at stage step 4.
  mu = optax.tree_utils.tree_get(history[5].opt_state, "mu")
  changed = False
  for name in before:
    assert before[name].sum() == after[name].sum()  # Exact per-matrix density.
    grown = np.asarray(after[name] & ~before[name])
    changed |= grown.any()
    assert not np.any(np.asarray(get_named(mu, name))[grown])  # Moments reset.
    assert not np.any(np.asarray(get_named(history[5].params, name))[grown])  # At zero.
  assert changed
  for step in (1, 2, 3, 4):  # No update between the update steps.
    for name in before:
      np.testing.assert_array_equal(_masks(history[step], "rigl")[name], before[name])


# The model _small_params draws from (d_model 48, 3 query heads, 1 KV head, MLP 256).
SMALL = ModelConfig(d_model=48, num_heads=3, num_kv_heads=1, mlp_dim=256, num_layers=1)


def _small_params(d_model=48, heads=3, kv_heads=1, mlp=256, seed=0):
  """One layer of SMALL's selected matrices as plain random params: no model init, so the mask
  updates are all a test compiles."""
  head_dim, rng = d_model // heads, np.random.default_rng(seed)
  kv = (d_model, kv_heads, head_dim)
  shapes = {"attention": {"query": (d_model, heads, head_dim), "key": kv, "value": kv,
                          "out": (heads, head_dim, d_model)},
            "mlp": {"gate": (d_model, mlp), "up": (d_model, mlp), "down": (mlp, d_model)}}
  return {"layer_0": {block: {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
                              for name, shape in matrices.items()}
                      for block, matrices in shapes.items()}}


def _mask_updates(method, params, steps):
  """[(active weights per matrix, the density metric, masks)] after the method's init and after
  each of `steps` (stage steps) through its own after_update, with random gradients."""
  from jaxlm.training.train_step import TrainState  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  state = TrainState(jnp.int32(0), params, optax.adam(1e-3).init(params),
                     {method.name: jax.jit(method.init)(params, jax.random.key(1))})
  after_update, metrics = jax.jit(method.after_update), jax.jit(method.metrics)
  history = []
  for step in [None, *steps]:
    if step is not None:
      grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
      state = after_update(state, grads, jnp.int32(step))
    masks = jax.device_get(_masks(state, method.name))
    history.append(({n: int(m.sum()) for n, m in masks.items()},
                    float(metrics(state)["density"]), masks))
  return history


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_rigl_and_set_keep_every_count_exact_where_erk_makes_a_matrix_dense(grow):
  """Density 0.45 with ERK over the key, value (d_model 48, 1 KV head of 16) and MLP up
  matrices makes key and value dense. Every update used to drop from them and regrow nothing
  (in a run: 768 -> 623 weights, overall density 0.45006 -> 0.43594)."""
  method = rigl(density=0.45, update_every=2, end_fraction=1.0, drop_fraction=0.3, grow=grow,
                patterns=[r"layer_\d+/attention/(key|value)", r"layer_\d+/mlp/up"])
  history = _mask_updates(method.for_stage(SMALL, 20), _small_params(), range(1, 10))
  counts, density, first = history[0]
  dense = [n for n, mask in first.items() if counts[n] == mask.size]
  assert dense == ["layer_0/attention/key", "layer_0/attention/value"]  # Not vacuous.
  for step, (now, now_density, _) in enumerate(history[1:], 1):
    assert now == counts, step  # Every matrix, exactly, after every step (updates at 2, 4, ...).
    assert now_density == density, step
  final = history[-1][2]
  assert np.any(final["layer_0/mlp/up"] != first["layer_0/mlp/up"])  # The sparse mask moved.


@pytest.mark.parametrize("density,fraction", [(1.0, 0.3), (0.95, 0.3), (0.6, 1.0), (0.5, 0.5),
                                              (0.01, 0.3), (0.002, 1.0)])
def test_drop_and_grow_keeps_the_count_at_any_density(density, fraction):
  """The per-matrix update alone, from a dense mask to one weight, up to dropping everything:
  the count never changes, only the dropped weights' places can."""
  from jaxlm.methods.sparsity.methods import drop_and_grow  # pylint: disable=import-outside-toplevel
  update = jax.jit(drop_and_grow)
  shape = (48, 1, 16)
  weight = jax.random.normal(jax.random.key(3), shape)
  count = max(1, round(density * weight.size))
  mask = topk_mask(jax.random.uniform(jax.random.key(4), shape), count)
  for i in range(3):
    growth = jnp.abs(jax.random.normal(jax.random.key(10 + i), shape))
    new = update(mask, weight, growth, jnp.float32(fraction))
    assert int(new.sum()) == count, i
    dropped = int(jnp.sum(mask & ~new))
    assert dropped <= int(np.floor(np.float32(fraction) * count))
    mask, weight = new, weight * new


@pytest.mark.parametrize("num_steps,start_fraction,end_fraction", [
    (10, 0.5, 1.0),   # The end is step 10 of steps 0..9: never reached, the last update at 8.
    (4, 0.25, 0.3),   # Start and end both round to step 1: that update pruned nothing.
    (10, 0.96, 1.0),  # The start rounds to step 10: no update at all.
])
def test_gradual_pruning_reaches_the_final_count_exactly_by_the_last_step(
    num_steps, start_fraction, end_fraction):
  method = gradual_pruning(final_density=0.3, start_fraction=start_fraction,
                           end_fraction=end_fraction, update_every=3, distribution="erk",
                           patterns=[r"layer_\d+/attention/key", r"layer_\d+/mlp/up"])
  params = _small_params()
  history = _mask_updates(method.for_stage(SMALL, num_steps), params, range(num_steps))
  chosen = {n: get_named(params, n) for n in history[0][0]}
  shapes = {n: as_matrix_shape(w.shape, selection.input_axes(anatomy(SMALL), n))
            for n, w in chosen.items()}
  want = kept_counts(layer_densities(shapes, 0.3, "erk"), {n: w.size for n, w in chosen.items()})
  assert history[-1][0] == want  # Exactly static sparsity's counts at the same density.
  for (before, _, old), (after, _, new) in zip(history, history[1:]):
    for name in before:  # Pruning only: counts never rise, a pruned weight never returns.
      assert after[name] <= before[name] and not np.any(new[name] & ~old[name])


def test_erk_at_density_1_is_dense_whatever_the_rounding():
  """Every layer is over 1 by a rounding error and made dense: the re-solve over no layers
  divided by zero."""
  shapes = {"a": (79, 198), "b": (209, 201)}
  assert layer_densities(shapes, 1.0, "erk") == {"a": 1.0, "b": 1.0}
  assert kept_counts(layer_densities(shapes, 1.0, "erk"), {"a": 79 * 198, "b": 209 * 201}) == {
      "a": 79 * 198, "b": 209 * 201}


def test_densify_keeps_the_function_and_the_dense_stage_trains_the_pruned_weights(
    small_text_file):
  sparse = tiny_stage(small_text_file, 3, methods=(nm_sparsity(),))
  state = init_state(sparse, jax.random.key(0))  # SR-STE keeps dense weights: a real mask.
  dense_stage = dataclasses.replace(sparse, methods=(), transition=(densify,))
  handed = densify(state, TransitionContext(sparse, dense_stage, jax.random.key(0)))
  tokens = random_batch(sparse)["inputs"]
  masked_params = sparse.methods[0].params_for_loss(state.params, state.method_state[
      "nm_sparsity"], 0)
  np.testing.assert_array_equal(forward(handed.params, sparse.model, tokens),
                                forward(masked_params, sparse.model, tokens))
  w = get_named(handed.params, "layer_0/mlp/up")
  assert np.count_nonzero(w) == w.size // 2


def test_masks_shard_like_their_params(small_text_file):
  stage = tiny_stage(small_text_file, 2, methods=(static_sparsity(),))
  mesh, rules = mesh_and_rules()
  shardings = state_shardings(stage, mesh, rules)
  masks = shardings.method_state["static_sparsity"]["masks"]
  assert len(masks) == 2 * 7
  for name, sharding in masks.items():
    assert sharding.spec == get_named(shardings.params, name).spec


@pytest.mark.parametrize("make,message", [
    (lambda: static_sparsity(density=1.5), "static_sparsity.density=1.5 must be in (0, 1]"),
    (lambda: static_sparsity(density=0.0), "must be in (0, 1]"),
    (lambda: nm_sparsity(n=4, m=2), "1 <= N <= M, got N=4, M=2"),
    (lambda: gradual_pruning(start_fraction=0.8, end_fraction=0.5),
     "the schedule ends before it starts"),
    (lambda: rigl(grow="sideways"), "rigl.grow='sideways'"),
])
def test_bad_sparsity_settings_are_one_line(make, message):
  with pytest.raises(UserError) as error:
    make()
  assert message in str(error.value).splitlines()[0]


@pytest.mark.parametrize("method,message", [
    (lambda: nm_sparsity(n=2, m=5), "M=5 does not divide the input dimension 64"),
    (lambda: static_sparsity(patterns=[r"layer_\d+/mlp/upp"]), "matches no parameter"),
])
def test_bad_sparsity_for_the_model_is_refused_before_training(small_text_file, method, message):
  from jaxlm.training.train_step import abstract_state  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError) as error:
    abstract_state(tiny_stage(small_text_file, 2, methods=(method(),)))
  assert message in str(error.value).splitlines()[0]


# --- Killed and resumed through the CLI -------------------------------------------------------

RIGL_GIN = """
run.stages = [@sparse/Stage()]
sparse/Stage.num_steps = 12
Stage.methods = [@rigl()]
rigl.update_every = 4
rigl.end_fraction = 1.0
"""


@pytest.fixture(scope="module")
def rigl_reference(tmp_path_factory):
  """A 12-step RigL run (mask updates at stage steps 4 and 8, checkpoints every 2)."""
  import textwrap  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("rigl")
  corpus, gin_file = root / "corpus.txt", root / "rigl.gin"
  corpus.write_text(open(textwrap.__file__, encoding="utf-8").read(), encoding="utf-8")
  gin_file.write_text(RIGL_GIN, encoding="utf-8")
  run_to_the_end(cli_run_args(root / "reference", corpus, gin_file), cwd=REPO_ROOT)
  return root, corpus, gin_file


@pytest.mark.slow  # A minute of subprocesses per kill point; .ci/run runs the slow tests.
@pytest.mark.parametrize("kill_after", [5, 7], ids=["right_after_an_update", "between_updates"])
def test_a_sparse_run_killed_mid_way_resumes_bitwise(rigl_reference, monkeypatch, kill_after):
  """Killed once step `kill_after` is logged: step 5 holds the mask update of stage step 4, the
  resume point is the last checkpoint (every 2 steps) at or before the kill."""
  root, corpus, gin_file = rigl_reference
  monkeypatch.chdir(REPO_ROOT)
  got = killed_run_resumes_bitwise(root / "reference", root / f"killed_{kill_after}", corpus,
                                   gin_file, kill_after, final_step=12)
  assert set(got["method_state"]) == {"rigl"}


@pytest.mark.slow  # Two 8-device subprocess runs; .ci/run runs the slow tests.
def test_sparse_training_is_the_same_on_8_devices(tmp_path, small_text_file):
  """Masks placed like their params on a 2x2x2 mesh (FSDP and tensor splits): the same losses
  as on one device, for a static mask and for RigL's mask update (its top-k on sharded
  matrices)."""
  runs = {"static": ["--gin.Stage.methods=[@static_sparsity()]"],
          "rigl": ["--gin.Stage.methods=[@rigl()]", "--gin.rigl.update_every=5"]}
  one = run_mesh_worker(tmp_path / "one", small_text_file, 1,
                    {k: v + mesh_flags(1, 1, 1) for k, v in runs.items()})
  eight = run_mesh_worker(tmp_path / "eight", small_text_file, 8,
                      {k: v + mesh_flags(2, 2, 2) for k, v in runs.items()})
  single, many = mesh_result(one), mesh_result(eight)
  for name in runs:
    assert len(single[name]) == 20
    np.testing.assert_allclose(many[name], single[name], rtol=1e-5, err_msg=name)
