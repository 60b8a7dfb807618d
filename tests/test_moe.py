"""The mixture-of-experts MLP (jaxlm/model/moe.py): routing, both dispatch paths, the balancing
losses and metrics, active-parameter FLOPs, and expert parallelism on an 8-device CPU mesh."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.flops import matmul_params
from jaxlm.model.layers import SwiGLU
from jaxlm.model.moe import (MoEMLP, balancing_losses, capacity_experts, expert_capacity,
                             route)
from jaxlm.model.transformer import features_and_losses

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                    mlp_dim=48)
MOE = dataclasses.replace(DENSE, moe_layers="all", num_experts=4, experts_per_token=2)
# Float32 sums taken in another order (k weighted expert outputs, the one-hot einsums).
SUM_ORDER = 1e-6


def tokens(rows=2, length=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (rows, length), 0, DENSE.vocab_size)


def moe_output(config, params, x_BLD):
  return MoEMLP(config).apply({"params": params}, x_BLD, mutable=["losses", "metrics"])


def test_dropless_and_capacity_are_the_same_function_when_nothing_is_dropped():
  config = dataclasses.replace(MOE, capacity_factor=2.0)  # C = L: no expert can overflow.
  params = init_params(config, jax.random.key(0))
  outputs = {}
  for dispatch in ("dropless", "capacity"):
    run = dataclasses.replace(config, moe_dispatch=dispatch)
    (x_BLD, _), extras = jax.jit(lambda p, run=run: features_and_losses(p, run, tokens()))(
        params)
    grads = jax.jit(jax.grad(lambda p, run=run: jnp.sum(
        features_and_losses(p, run, tokens())[0][0] ** 2)))(params)
    outputs[dispatch] = (x_BLD, grads, extras)
  (x_a, g_a, e_a), (x_b, g_b, e_b) = outputs["dropless"], outputs["capacity"]
  np.testing.assert_allclose(x_a, x_b, atol=SUM_ORDER)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):  # Relative to the leaf's scale.
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  assert float(e_b.metrics["layer_0/mlp/dropped_fraction"]) == 0.0
  np.testing.assert_array_equal(e_a.metrics["layer_1/mlp/expert_load"],
                                e_b.metrics["layer_1/mlp/expert_load"])


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_identical_experts_with_topk_softmax_are_the_dense_mlp(dispatch):
  """The upcycling premise (2212.05055): experts that are copies of one MLP, weights that sum to
  one, give the dense MLP's output whatever the router picks."""
  config = dataclasses.replace(MOE, moe_dispatch=dispatch, capacity_factor=2.0)
  x_BLD = jax.random.normal(jax.random.key(2), (2, 16, config.d_model))
  dense = nn.unbox(SwiGLU(config).init(jax.random.key(3), x_BLD)["params"])
  moe = nn.unbox(MoEMLP(config).init(jax.random.key(4), x_BLD)["params"])
  copies = {name: jnp.stack([dense[name]] * config.num_experts) for name in ("gate", "up", "down")}
  out, _ = moe_output(config, {**moe, **copies}, x_BLD)
  np.testing.assert_allclose(out, SwiGLU(config).apply({"params": dense}, x_BLD),
                             atol=SUM_ORDER)


def test_the_two_routers():
  logits_TE = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
  weights, experts = route(logits_TE, dataclasses.replace(MOE, router="topk_softmax"))
  np.testing.assert_array_equal(experts, [[0, 1], [2, 1]])
  np.testing.assert_allclose(weights, jax.nn.softmax(jnp.array([[2.0, 1.0], [3.5, 3.0]])))
  weights, _ = route(logits_TE, dataclasses.replace(MOE, router="softmax_topk"))
  np.testing.assert_allclose(weights, jax.nn.softmax(logits_TE)[:, :2].at[1].set(
      jax.nn.softmax(logits_TE)[1, jnp.array([2, 1])]), rtol=1e-6)
  assert float(jnp.sum(weights[0])) < 1.0  # Switch-style: not renormalised.


def test_capacity_drops_second_choices_first_and_counts_them():
  """Every token of a row prefers expert 0, then expert 1: with 2 slots per expert (L=4, k=2,
  E=4, factor 1) the first two tokens' first choices fill expert 0, the first two tokens'
  second choices expert 1, and the other copies are dropped."""
  config = dataclasses.replace(MOE, capacity_factor=1.0)
  capacity = expert_capacity(config, 4)
  assert capacity == 2
  x_BLD = jnp.arange(4, dtype=jnp.float32)[None, :, None] + jnp.ones((1, 4, 3))
  experts_BLK = jnp.array([[[0, 1]] * 4])
  weights_BLK = jnp.full((1, 4, 2), 0.5)
  # Experts that return their input (gate = big, so silu(gate) ~ gate; up = 1; down = I / big).
  e, d, f = 4, 3, 3
  big = 1e3
  w_gate_up = jnp.stack([jnp.broadcast_to(big * jnp.eye(d), (e, d, f)),
                         jnp.broadcast_to(jnp.eye(d), (e, d, f))], axis=2)
  w_down = jnp.broadcast_to(jnp.eye(f) / big, (e, f, d))
  out, dropped = capacity_experts(x_BLD, weights_BLK, experts_BLK, w_gate_up, w_down, capacity)
  np.testing.assert_allclose(out[0, :2], x_BLD[0, :2] ** 2, rtol=1e-5)  # Both choices kept.
  np.testing.assert_array_equal(out[0, 2:], 0.0)  # Both choices dropped.
  assert float(dropped) == 0.5


def test_balancing_losses_and_expert_load_are_sown_and_trained():
  params = init_params(MOE, jax.random.key(0))
  extras_of = jax.jit(lambda p: features_and_losses(p, MOE, tokens())[1])
  extras = extras_of(params)
  assert sorted(extras.losses) == ["load_balancing", "router_z"]
  for layer in (0, 1):
    load = np.asarray(extras.metrics[f"layer_{layer}/mlp/expert_load"])
    assert load.shape == (4,) and abs(load.sum() - 1.0) < 1e-6
  # A uniform router (zero weights): P_i = 1/E, so E sum_i f_i P_i = 1 per layer, and every
  # logsumexp is log E.
  flat = {**params, **{f"layer_{i}": {**params[f"layer_{i}"], "mlp": {
      **params[f"layer_{i}"]["mlp"], "router": jnp.zeros((32, 4))}} for i in (0, 1)}}
  extras = extras_of(flat)
  np.testing.assert_allclose(extras.losses["load_balancing"], 2 * MOE.load_balancing_weight,
                             rtol=1e-6)
  np.testing.assert_allclose(extras.losses["router_z"],
                             2 * MOE.router_z_loss_weight * np.log(4.0) ** 2, rtol=1e-6)
  # The balancing loss reaches the router: its gradient is not zero.
  grad = jax.jit(jax.grad(lambda p: extras_of(p).losses["load_balancing"]))(params)
  assert float(jnp.abs(grad["layer_0"]["mlp"]["router"]).max()) > 0


def test_the_balancing_loss_on_a_hand_computed_router():
  """Three tokens, E = 3, k = 1. Choices 0, 0, 2: f = (2/3, 0, 1/3). P = the mean of the
  softmax rows. Loss = E sum_i f_i P_i; z-loss = mean(logsumexp^2)."""
  logits = np.array([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 3.0]], np.float32)
  config = dataclasses.replace(MOE, num_experts=3, experts_per_token=1)
  _, experts = route(jnp.asarray(logits), config)
  np.testing.assert_array_equal(experts[:, 0], [0, 0, 2])
  balance, z_loss, load = balancing_losses(jnp.asarray(logits), experts, 3)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  f = np.array([2 / 3, 0.0, 1 / 3])
  np.testing.assert_allclose(load, f, rtol=1e-6)
  np.testing.assert_allclose(balance, 3 * np.sum(f * probs.mean(axis=0)), rtol=1e-6)
  lse = np.log(np.exp(logits).sum(axis=1))
  np.testing.assert_allclose(z_loss, np.mean(lse ** 2), rtol=1e-6)


def test_growth_of_an_moe_model_is_exact_in_width_and_depth():
  """The experts' hidden units grow like an MLP's (copies halved where `down` reads them), a
  wider stream gives the router zero-reading rows, and whole MoE blocks stack."""
  from helpers import EXACT, logit_error, trained_like, wider
  from jaxlm.methods.growth.depth import depth_sources, grow_depth
  from jaxlm.methods.growth.width import grow_width
  from jaxlm.model.anatomy import anatomy
  small = dataclasses.replace(MOE, moe_dispatch="dropless")
  params = trained_like(small)
  for sizes in ({"mlp_dim": 96}, {"d_model": 64, "head_dim": 16}):
    large = wider(small, **sizes)
    grown = grow_width(params, small, large, init_params(large, jax.random.key(1)), "fpi",
                       "fpi", "exact")
    assert logit_error(params, small, grown, large) < EXACT, sizes
  deep = grow_depth(params, depth_sources(2, 4, "stack"), anatomy(small), zero_copies=True)
  assert logit_error(params, small, deep, dataclasses.replace(small, num_layers=4)) < EXACT


def test_subcloning_refuses_an_moe_block_in_one_line():
  from jaxlm.methods.growth.subcloning import activation_stats
  config = dataclasses.replace(MOE, moe_layers=(1,))
  with pytest.raises(UserError, match=r"block 1 \(an MoE layer\) sows 0 of them"):
    activation_stats(init_params(config, jax.random.key(0)), config, [tokens()])


def test_sparsity_masks_the_experts_and_never_the_router():
  """N:M groups of an expert matrix run along the axis it reads (embed for gate/up, mlp for
  down), per expert; the router stays dense."""
  from jaxlm.methods.sparsity.topk import nm_mask
  from jaxlm.methods.sparsity.selection import input_axes, select
  from jaxlm.model.anatomy import anatomy
  parts = anatomy(MOE)
  params = init_params(MOE, jax.random.key(0))
  chosen = select(params, parts)
  assert "layer_0/mlp/gate" in chosen and not any("router" in name for name in chosen)
  down = chosen["layer_0/mlp/down"]
  mask = nm_mask(down, 2, 4, input_axes(parts, "layer_0/mlp/down"))
  kept = np.asarray(mask).reshape(4, 48 // 4, 4, 32).sum(axis=2)  # Groups of 4 along mlp.
  assert (kept == 2).all()


def test_the_train_step_logs_the_model_losses_and_the_expert_load():
  from helpers import mesh_and_rules, random_batch
  from jaxlm import parallel
  from jaxlm.data import DataConfig
  from jaxlm.training.stages import Stage
  from jaxlm.training.train_step import make_train_step, sharded_init, state_shardings
  model = dataclasses.replace(MOE, vocab_size=256, moe_layers=(1,), moe_dispatch="capacity",
                              capacity_factor=0.5)
  stage = Stage(num_steps=200, model=model, data=DataConfig(seq_len=16, batch_size=2))
  mesh, rules = mesh_and_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(stage, mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(0))
    _, metrics = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))(
        state, random_batch(stage, rows=2))
  assert {"train/aux/model/load_balancing", "train/aux/model/router_z",
          "train/model/layer_1/mlp/dropped_fraction"} <= set(metrics)
  load = [float(metrics[f"train/model/layer_1/mlp/expert_load/{i}"]) for i in range(4)]
  assert abs(sum(load) - 1) < 1e-6 and "train/model/layer_0/mlp/expert_load/0" not in metrics
  assert float(metrics["train/model/layer_1/mlp/dropped_fraction"]) > 0  # 2 slots for 8 copies.


def test_flops_count_the_routed_experts_only():
  moe_one = dataclasses.replace(MOE, moe_layers=(1,))
  expert_params = 3 * MOE.d_model * MOE.mlp_dim * MOE.num_experts
  router = MOE.d_model * MOE.num_experts
  dense_mlp = 3 * MOE.d_model * MOE.mlp_dim
  assert matmul_params(moe_one) == (matmul_params(DENSE) - dense_mlp + router
                                    + expert_params * 2 // 4)


def test_experts_that_do_not_divide_over_the_expert_axis_are_one_line():
  from jax.sharding import AbstractMesh
  from jaxlm import parallel
  from jaxlm.training.stages import Stage
  from jaxlm.training.train_step import state_shardings
  mesh = AbstractMesh((1, 1, 1, 3), parallel.MESH_AXES)  # expert = 3; E = 4.
  with pytest.raises(UserError, match=r"dimension of 4 that mesh axes \('expert',\) \(size 3\)"):
    state_shardings(Stage(num_steps=200, model=MOE), mesh, parallel.RULE_SETS["fsdp_tensor"])


@pytest.mark.parametrize("overrides, match", [
    ({"num_experts": 16}, "ModelConfig.num_experts is set but no block is an MoE layer"),
    ({"moe_layers": "odd"}, "moe_layers='odd'; choose one of"),
    ({"moe_layers": (0, 5)}, "must name distinct blocks in 0..1"),
    ({"moe_layers": "all", "experts_per_token": 9}, "experts_per_token must be"),
    ({"moe_layers": "all", "moe_dispatch": "sorted"}, "moe_dispatch must be one of"),
    ({"moe_layers": "all", "capacity_factor": 0.0}, "capacity_factor must be a number in"),
])
def test_bad_moe_settings_are_one_clear_line(overrides, match):
  with pytest.raises(UserError, match=match):
    dataclasses.replace(DENSE, **overrides)


def test_moe_layers_from_gin_are_a_hashable_tuple():
  config = dataclasses.replace(DENSE, moe_layers=[1])
  assert config.moe_layers == (1,) and config.moe_blocks == (1,) and hash(config)
  assert dataclasses.replace(DENSE, num_layers=4, moe_layers="every_other").moe_blocks == (1, 3)


SHARDED = r"""
import dataclasses, json
import flax.linen as nn, jax, jax.numpy as jnp
from jaxlm import parallel
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.loss import training_losses
from jaxlm.model.transformer import logical_axes
base = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                   mlp_dim=48, moe_layers="all", num_experts=4, capacity_factor=1.0)
tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 64)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "positions": jnp.broadcast_to(jnp.arange(16), (8, 16)),
         "segment_ids": jnp.ones((8, 16), jnp.int32), "weights": jnp.ones((8, 16))}
mesh_config = parallel.MeshConfig(data=2, fsdp=1, tensor=2, expert=2)
mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
params = init_params(base, jax.random.key(0))
results = {}
for dispatch in ("capacity", "dropless"):
  config = dataclasses.replace(base, moe_dispatch=dispatch)
  def loss(params):
    ce, extras = training_losses(params, config, batch)
    return jnp.mean(ce) + sum(extras.losses.values()), extras.metrics
  (plain, plain_metrics), plain_grads = jax.value_and_grad(loss, has_aux=True)(params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = parallel.logical_shardings(params, logical_axes(config), mesh, rules)
    sharded = jax.device_put(params, shardings)
    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded)
  results[dispatch] = {
      "loss": abs(float(value) - float(plain)),
      "grads": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads))),
      "dropped": [float(metrics["layer_0/mlp/dropped_fraction"]),
                  float(plain_metrics["layer_0/mlp/dropped_fraction"])],
      "spec": str(sharded["layer_0"]["mlp"]["gate"].sharding.spec)}
print("RESULT " + json.dumps(results))
"""


def test_expert_parallel_on_eight_devices_matches_one_device():
  """Both dispatch paths on a data 2 x tensor 2 x expert 2 mesh: the experts split over
  `expert`, the loss and every gradient as on one device (float32 sums split over devices)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        timeout=300, cwd=REPO_ROOT, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
  for dispatch, result in results.items():
    assert result["spec"] == "P('expert', 'fsdp', 'tensor')", dispatch
    assert result["loss"] < 1e-5 and result["grads"] < 1e-5, (dispatch, result)
    assert result["dropped"][0] == result["dropped"][1], dispatch  # The same tokens dropped.
  assert results["capacity"]["dropped"][0] > 0  # Capacity factor 1: some tokens overflow.
