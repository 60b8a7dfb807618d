"""Sharded training: same losses on every mesh, shardings follow the rule set, gradient
accumulation equals the full batch, and two processes equal one (jax.distributed over gloo)."""

import functools
import json
import os
import re
import socket
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT
from jaxlm import parallel
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, init_params, logical_axes
from jaxlm.optim.matrix_optimizers import galore, muon
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.state_layout import state_layout
from jaxlm.training.stages import Stage
from jaxlm.training.train_step import sharded_init, state_shardings
from jaxlm.tree_names import flatten_names
from helpers import mesh_flags, mesh_result, run_mesh_worker
from jaxlm.training.saved_run import load_saved_run

# Sharded matmuls and all-reduces add float32 partial sums in other orders (~1e-7 relative per
# op); 20 Adam steps amplify that to the observed ~3e-7. A real bug (a wrong shard, a missing
# all-reduce, a dropped micro-batch) moves the loss by more than 1e-2.
RTOL = 1e-5


def test_loss_trajectory_is_the_same_on_every_mesh_and_with_accumulation(tmp_path, small_text_file):
  single = mesh_result(run_mesh_worker(tmp_path / "one", small_text_file, 1, {
      "1x1x1": mesh_flags(1, 1, 1),
      "1x1x1/accumulate4": [*mesh_flags(1, 1, 1), "--gin.TrainerConfig.microbatches=4"]}))
  many = mesh_result(run_mesh_worker(tmp_path / "eight", small_text_file, 8, {
      "2x2x2": mesh_flags(2, 2, 2),
      "2x2x2/accumulate4": [*mesh_flags(2, 2, 2), "--gin.TrainerConfig.microbatches=4"]}))
  reference = np.array(single["1x1x1"])
  assert len(reference) == 20 and reference[-1] < reference[0] - 1.0  # It really trained.
  for name, losses in {**single, **many}.items():
    np.testing.assert_allclose(losses, reference, rtol=RTOL, err_msg=name)
  # Evaluated here, on this process's one device: the saved 2x2x2 mesh gives way to one that
  # fits, unless the caller binds the mesh itself.
  eight_device_run = str(tmp_path / "eight" / "runs" / "2x2x2")
  assert jax.device_count() == 1
  assert load_saved_run(eight_device_run).mesh.size == 1
  with pytest.raises(UserError, match="needs 8 devices but there are 1"):
    load_saved_run(eight_device_run, gin_bindings=["MeshConfig.data = 2"])


@pytest.mark.slow
def test_loss_trajectory_is_the_same_on_single_axis_and_uneven_meshes(tmp_path, small_text_file):
  """The meshes the default test leaves out (one axis of 8, 2x1x4, the Pallas kernel per
  shard), to keep the default suite under 15 minutes."""
  reference = np.array(mesh_result(run_mesh_worker(tmp_path / "one", small_text_file, 1, {
      "1x1x1": mesh_flags(1, 1, 1)}))["1x1x1"])
  many = mesh_result(run_mesh_worker(tmp_path / "eight", small_text_file, 8, {
      "8x1x1": mesh_flags(8, 1, 1), "1x8x1": mesh_flags(1, 8, 1),
      "2x1x4": mesh_flags(2, 1, 4),
      # The Pallas kernel (interpret mode on CPU) runs per shard through shard_map.
      "2x2x2/pallas": [*mesh_flags(2, 2, 2), "--gin.ModelConfig.attention_impl='pallas'"]}))
  for name, losses in many.items():
    np.testing.assert_allclose(losses, reference, rtol=RTOL, err_msg=name)


@pytest.mark.slow  # Half a minute; the default suite must stay under 15 minutes (.ci/run runs it).
def test_two_processes_give_the_same_losses_as_one_process_with_four_devices(tmp_path, small_text_file):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workers = [
      run_mesh_worker(tmp_path / "multi", small_text_file, 2, {"2proc": [
          *mesh_flags(4, 1, 1),
          f"--gin.DistributedConfig.coordinator_address='127.0.0.1:{port}'",
          "--gin.DistributedConfig.num_processes=2",
          f"--gin.DistributedConfig.process_id={i}"]})
      for i in range(2)]
  one_process = mesh_result(run_mesh_worker(tmp_path / "single", small_text_file, 4, {"1proc": mesh_flags(4, 1, 1)}))
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  lead = json.loads(next(l for l in outputs[0][0].splitlines() if l.startswith("RESULT "))[7:])
  assert "RESULT" not in outputs[1][0]  # Only process 0 reports and writes logs.
  np.testing.assert_allclose(lead["2proc"], one_process["1proc"], rtol=RTOL)
  assert os.path.isdir(tmp_path / "multi" / "runs" / "2proc" / "checkpoints" / "20")


# Logical axes -> mesh axes for a few parameters under each rule set.
SHARDING_TABLE = {
    "data_parallel": {
        ("embed", "embedding"): P(None, None),
        ("layer_0", "attention", "query"): P(None, None, None),
        ("layer_0", "mlp", "down"): P(None, None),
        ("lm_head",): P(None, None),
    },
    "fsdp": {
        ("embed", "embedding"): P(None, "fsdp"),
        ("layer_0", "attention", "query"): P("fsdp", None, None),
        ("layer_0", "mlp", "down"): P(None, "fsdp"),
        ("lm_head",): P("fsdp", None),
    },
    "fsdp_tensor": {
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("layer_0", "attention", "query"): P("fsdp", "tensor", None),
        ("layer_0", "attention", "key"): P("fsdp", "tensor", None),
        ("layer_0", "attention", "out"): P("tensor", None, "fsdp"),
        ("layer_0", "mlp", "gate"): P("fsdp", "tensor"),
        ("layer_0", "mlp", "down"): P("tensor", "fsdp"),
        ("layer_0", "mlp_norm", "scale"): P("fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
    },
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("rules", sorted(SHARDING_TABLE))
def test_param_and_optimizer_state_shardings_follow_the_rule_set(rules):
  config = parallel.MeshConfig(data=1, rules=rules)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  stage = Stage(num_steps=200, model=ModelConfig(d_model=64, num_layers=1, mlp_dim=128))
  shardings = state_shardings(stage, mesh, config.resolved_rules())
  state = sharded_init(stage, shardings, jax.random.key(0))
  # inject_hyperparams(chain(clip, adamw)): adamw's first part is scale_by_adam.
  adam = state.opt_state.inner_state[1][0]
  for path, spec in SHARDING_TABLE[rules].items():
    assert _get(state.params, path).sharding.spec == spec, path
    assert _get(adam.mu, path).sharding.spec == spec, path
    assert _get(adam.nu, path).sharding.spec == spec, path
  assert adam.count.sharding.spec == P()


def test_a_dimension_that_does_not_divide_its_mesh_axes_is_a_clear_error():
  mesh = AbstractMesh((1, 1, 3, 1), parallel.MESH_AXES)
  stage = Stage(num_steps=200, model=ModelConfig(num_heads=4, num_kv_heads=4))
  with pytest.raises(UserError, match="cannot split evenly"):
    state_shardings(stage, mesh, parallel.RULE_SETS["fsdp_tensor"])


@pytest.mark.parametrize("settings, devices, match", [
    ({"data": -1, "fsdp": 3}, 8, "does not divide the 8 devices"),
    ({"data": 3}, 8, "needs 3 devices but there are 8"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, 8, "needs 16 devices"),
    ({"data": -1, "fsdp": -1}, 8, "at most one -1"),
    ({"rules": (("embed", "model"),)}, 1, "unknown mesh axis 'model'"),  # Found when built.
    ({"rules": "zero4"}, 1, "unknown rule set 'zero4'"),
])
def test_bad_mesh_or_rules_are_clear_errors(settings, devices, match):
  with pytest.raises(UserError, match=match):
    config = parallel.MeshConfig(**settings)
    config.shape(devices)
    config.resolved_rules()


def test_bad_mesh_on_the_command_line_exits_2(tmp_path, small_text_file, capsys):
  from conftest import quick_run_args
  from jaxlm import train
  assert train.main(quick_run_args(tmp_path / "run", small_text_file,
                                   "--gin.MeshConfig.data=3")) == 2
  assert "needs 3 devices but there are 1" in capsys.readouterr().err


# Optimizer-state shardings on a real mesh of 8 CPU devices. jax fixes its device count when it
# starts, so these tests run in one child pytest with 8 forced host devices; here each checks
# the child's outcome for itself.
EIGHT_DEVICES_ENV = "JAXLM_TEST_EIGHT_CPU_DEVICES"
MESH_8 = parallel.MeshConfig(data=1, fsdp=4, tensor=2)
EIGHT_DEVICE_TESTS = []


@pytest.fixture(scope="module")
def eight_device_outcomes():
  env = {**os.environ, EIGHT_DEVICES_ENV: "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  tests = [f"tests/test_parallel.py::{name}" for name in EIGHT_DEVICE_TESTS]
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                         *tests], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  outcomes = {name: outcome for outcome, name in re.findall(
      r"^([A-Z]+) tests/test_parallel.py::(\w+)", done.stdout, re.M)}
  return outcomes, done.stdout + done.stderr


def on_eight_devices(test):
  """`test(mesh)` runs in the child, on a data=1, fsdp=4, tensor=2 mesh of CPU devices."""
  EIGHT_DEVICE_TESTS.append(test.__name__)

  def run(request):
    if os.environ.get(EIGHT_DEVICES_ENV):
      return test(parallel.make_mesh(MESH_8, jax.devices("cpu")[:8]))
    outcomes, output = request.getfixturevalue("eight_device_outcomes")
    assert outcomes.get(test.__name__) == "PASSED", output[-8000:]

  run.__name__ = test.__name__
  return run


# d_model 64, 4 heads of 16, mlp 192, vocab 384: no parameter has two dimensions of one size.
MODEL_8 = ModelConfig(d_model=64, num_layers=1, mlp_dim=192)


def _setup(mesh, optimizer):
  """The trainer's optimizer (inject_hyperparams around `optimizer`), abstract params, their
  logical shardings, and the abstract optimizer state."""
  tx = Stage(num_steps=10, model=MODEL_8, optimizer=optimizer).make_optimizer()
  abstract_params = jax.eval_shape(lambda: init_params(MODEL_8, jax.random.key(0)))
  param_shardings = parallel.logical_shardings(abstract_params, logical_axes(MODEL_8), mesh,
                                               MESH_8.resolved_rules())
  return tx, abstract_params, param_shardings, jax.eval_shape(tx.init, abstract_params)


def _assert_valid(abstract_tree, shardings, mesh):
  """Every spec has its leaf's rank and splits only dimensions that divide over its axes."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_tree)[0],
                                    jax.tree.leaves(shardings)):
    assert len(sharding.spec) == leaf.ndim, (jax.tree_util.keystr(path), sharding.spec)
    for size, axes in zip(leaf.shape, sharding.spec):
      axes = axes if isinstance(axes, tuple) else (axes,)
      devices = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
      assert size % devices == 0, (jax.tree_util.keystr(path), leaf.shape, sharding.spec)


def _init_into(tx, shardings):
  """Runs the optimizer's init straight into `shardings`; returns the state's shardings."""
  params = init_params(MODEL_8, jax.random.key(0))
  return jax.tree.map(lambda x: x.sharding, jax.jit(tx.init, out_shardings=shardings)(params))


def _spec_without(spec, dim):
  return P(*(axes for d, axes in enumerate(spec) if d != dim))


@on_eight_devices
@pytest.mark.slow  # Default suite under 15 minutes; .ci/run runs the slow tests.
def test_adafactor_factored_moments_keep_their_params_axes_on_the_dims_they_keep(mesh):
  tx, abstract_params, params, abstract_state = _setup(
      mesh, lambda learning_rate: optax.adafactor(learning_rate, min_dim_size_to_factor=8))
  shardings = parallel.optimizer_state_shardings(tx, abstract_state, params, mesh,
                                                 abstract_params)
  _assert_valid(abstract_state, shardings, mesh)
  factored = shardings.inner_state[0]  # inject_hyperparams(adafactor) = chain(factored, ...)
  checked = 0
  for (path, param), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                     jax.tree.leaves(params)):
    if param.ndim < 2:
      continue
    keys = [k.key for k in path]
    # optax: v_row drops the largest dimension, v_col the second largest.
    second, largest = np.argsort(param.shape)[-2:]
    assert _get(factored.v_row, keys).spec == _spec_without(sharding.spec, largest), keys
    assert _get(factored.v_col, keys).spec == _spec_without(sharding.spec, second), keys
    checked += 1
  assert checked == 9
  assert _init_into(tx, shardings) == shardings


class LowRank(NamedTuple):
  projector: Any  # (m, r)
  moment: Any  # (r, n)


def galore_like(rank: int, per_param: bool) -> optax.GradientTransformation:
  """GaLore's state (Zhao et al. 2403.03507) for every 2-D parameter: a projector and a
  low-rank moment; other parameters keep a full moment. `per_param` keeps a LowRank per
  parameter (which optax.tree_map_params cannot trace), else a tree of each. The update is
  the identity: only the state's layout matters here."""
  def projector(p):
    return jnp.zeros((p.shape[0], rank)) if p.ndim == 2 else jnp.zeros((1,))

  def moment(p):
    return jnp.zeros((rank, p.shape[1])) if p.ndim == 2 else jnp.zeros_like(p)

  def init(params):
    if per_param:
      return jax.tree.map(lambda p: LowRank(projector(p), moment(p)), params)
    return LowRank(jax.tree.map(projector, params), jax.tree.map(moment, params))

  return optax.GradientTransformation(init, lambda updates, state, params=None: (updates, state))


def _low_rank(state, keys, per_param) -> LowRank:
  if per_param:
    leaf = _get(state, keys)
    return leaf if isinstance(leaf, LowRank) else LowRank(None, leaf)
  return LowRank(_get(state.projector, keys), _get(state.moment, keys))


@on_eight_devices
def test_galore_projectors_split_m_like_their_param_and_replicate_the_rank(mesh):
  for per_param in (False, True):
    # Rank 3 divides no mesh axis: giving the projector its param's spec cannot work.
    tx, abstract_params, params, abstract_state = _setup(
        mesh, lambda learning_rate, per_param=per_param: optax.chain(
            galore_like(3, per_param), optax.scale(learning_rate)))
    shardings = parallel.optimizer_state_shardings(tx, abstract_state, params, mesh,
                                                   abstract_params)
    _assert_valid(abstract_state, shardings, mesh)
    checked = 0
    for (path, param), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                       jax.tree.leaves(params)):
      keys = [k.key for k in path]
      projector, moment = _low_rank(shardings.inner_state[0], keys, per_param)
      if param.ndim == 2:
        assert projector.spec == P(sharding.spec[0], None), (per_param, keys)
        assert moment.spec == P(None, sharding.spec[1]), (per_param, keys)
        checked += 1
      else:
        assert moment == sharding, (per_param, keys)
    assert checked == 5
    assert _init_into(tx, shardings) == shardings


@on_eight_devices
def test_real_adafactor_galore_and_muon_states_shard_by_their_layout(mesh):
  """optax's own states: every leaf of a param's shape takes the param's sharding, every other
  a valid one, and the optimizer initialises straight into them."""
  for optimizer in (lambda lr: optax.adafactor(lr, min_dim_size_to_factor=8),
                    lambda lr: optax.contrib.galore(lr, rank=4),
                    lambda lr: optax.contrib.muon(lr)):
    tx, abstract_params, params, abstract_state = _setup(mesh, optimizer)
    shardings = parallel.optimizer_state_shardings(tx, abstract_state, params, mesh,
                                                   abstract_params)
    _assert_valid(abstract_state, shardings, mesh)
    by_param = flatten_names(params)
    layout = state_layout(abstract_state, abstract_params, tx)
    same = [(tag, sharding) for tag, sharding in zip(layout, jax.tree.leaves(shardings))
            if tag.relation == "same"]
    assert same and all(sharding == by_param[tag.param] for tag, sharding in same)
    assert _init_into(tx, shardings) == shardings


@on_eight_devices
def test_galore_and_muon_factories_shard_by_their_layout(mesh):
  """Our gin factories (AdamW on the embeddings, head and norms): every leaf of a param's shape
  takes the param's sharding; GaLore's projectors and low-rank moments valid shardings with
  their rank (3, dividing no mesh axis) replicated; the optimizers initialise straight into
  them."""
  # 7 matrices: GaLore's projector, mu and nu, or Muon's momentum; AdamW's mu and nu of the
  # other 5 params.
  for optimizer, same, projected in ((functools.partial(galore, rank=3), 10, 21), (muon, 17, 0)):
    tx, abstract_params, params, abstract_state = _setup(mesh, optimizer)
    shardings = parallel.optimizer_state_shardings(tx, abstract_state, params, mesh,
                                                   abstract_params)
    _assert_valid(abstract_state, shardings, mesh)
    by_param = flatten_names(params)
    tagged = list(zip(state_layout(abstract_state, abstract_params, tx),
                      jax.tree.leaves(shardings)))
    full = [sharding == by_param[tag.param] for tag, sharding in tagged if tag.relation == "same"]
    assert len(full) == same and all(full)
    low_rank = [(tag, sharding) for tag, sharding in tagged if tag.relation == "projected"]
    assert len(low_rank) == projected
    assert all(sharding.spec[d] is None for tag, sharding in low_rank
               for d, size in enumerate(tag.shape) if size == 3)
    assert _init_into(tx, shardings) == shardings


@on_eight_devices
def test_adamw_moments_take_exactly_their_params_shardings(mesh):
  tx, abstract_params, params, abstract_state = _setup(mesh, adamw)
  replicated = NamedSharding(mesh, P())
  before = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state, params,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  assert parallel.optimizer_state_shardings(tx, abstract_state, params, mesh,
                                            abstract_params) == before
  adam = before.inner_state[1][0]  # chain(clip, adamw): adamw's first part is scale_by_adam.
  assert adam.mu == params and adam.nu == params and adam.count == replicated


@on_eight_devices
def test_the_trainer_initialises_factored_and_low_rank_state_into_valid_shardings(mesh):
  for optimizer in (lambda learning_rate: optax.adafactor(learning_rate, min_dim_size_to_factor=8),
                    lambda learning_rate: optax.chain(galore_like(3, True),
                                                      optax.scale(learning_rate))):
    stage = Stage(num_steps=10, model=MODEL_8, optimizer=optimizer)
    shardings = state_shardings(stage, mesh, MESH_8.resolved_rules())
    state = sharded_init(stage, shardings, jax.random.key(0))
    _assert_valid(state.opt_state, shardings.opt_state, mesh)
