"""Sparse upcycling (jaxlm/methods/growth/upcycling.py): dense MLPs into MoE layers, plain
(2212.05055) and fine-grained (2410.07524), exact where the router's weights sum to one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import (EXACT, QUIET, TINY, gin_run_resumes_bitwise, growth_ctx, logit_error,
                     metric_records, tiny_stage, trained_like)
from jaxlm.checkpointing.restore import RestoreConfig
from jaxlm.errors import UserError
from jaxlm.methods.growth.upcycling import upcycle_params, upcycle_scale, upcycle_transition
from jaxlm.model import ModelConfig, init_params
from jaxlm.training import trainer
from jaxlm.training.train_step import TrainState

DENSE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                    mlp_dim=48)


def moe(**fields):
  fields = {"moe_layers": "all", "num_experts": 4, "experts_per_token": 2, **fields}
  return dataclasses.replace(DENSE, **fields)


@pytest.mark.parametrize("target, granularity", [
    (moe(moe_dispatch="dropless"), 1),
    (moe(moe_dispatch="capacity", capacity_factor=2.0), 1),
    (moe(moe_layers="every_other", moe_dispatch="dropless"), 1),
    (moe(num_experts=8, expert_mlp_dim=24, moe_dispatch="dropless"), 2),  # 4 groups of 2 shards.
    (moe(num_experts=8, experts_per_token=4, expert_mlp_dim=12, moe_dispatch="capacity",
         capacity_factor=4.0), 4),
])
def test_upcycling_with_topk_softmax_keeps_the_dense_function(target, granularity):
  params = trained_like(DENSE)
  fresh = init_params(target, jax.random.key(3))
  upcycled = upcycle_params(params, DENSE, target, fresh, granularity)
  assert jax.tree.map(jnp.shape, upcycled) == jax.tree.map(jnp.shape, fresh)
  assert logit_error(params, DENSE, upcycled, target) < EXACT


@pytest.mark.parametrize("granularity", [1, 2])
def test_softmax_topk_is_scaled_by_e_g_over_k_and_exact_under_a_uniform_router(granularity):
  target = moe(router="softmax_topk", num_experts=8, expert_mlp_dim=48 // granularity,
               moe_dispatch="dropless")
  assert upcycle_scale(target, granularity) == 8 * granularity / 2
  params = trained_like(DENSE)
  upcycled = upcycle_params(params, DENSE, target, init_params(target, jax.random.key(3)),
                            granularity)
  shard = params["layer_0"]["mlp"]["down"][:48 // granularity]
  np.testing.assert_array_equal(upcycled["layer_0"]["mlp"]["down"][0],
                                shard * upcycle_scale(target, granularity))
  # A zero router: every expert weighs 1/E and the k chosen ones are group 0's shards.
  for layer in ("layer_0", "layer_1"):
    upcycled[layer]["mlp"]["router"] = jnp.zeros_like(upcycled[layer]["mlp"]["router"])
  assert logit_error(params, DENSE, upcycled, target) < EXACT


def test_the_router_repeats_one_fresh_row_per_group_and_the_rest_is_copied():
  target = moe(num_experts=8, expert_mlp_dim=24)
  params, fresh = trained_like(DENSE), init_params(target, jax.random.key(3))
  upcycled = upcycle_params(params, DENSE, target, fresh, granularity=2)
  router = upcycled["layer_1"]["mlp"]["router"]
  np.testing.assert_array_equal(router[:, 0::2], fresh["layer_1"]["mlp"]["router"][:, :4])
  np.testing.assert_array_equal(router[:, 1::2], router[:, 0::2])
  np.testing.assert_array_equal(upcycled["layer_1"]["mlp"]["gate"][3],  # Expert 1*2 + 1.
                                params["layer_1"]["mlp"]["gate"][:, 24:])
  np.testing.assert_array_equal(upcycled["layer_0"]["attention"]["query"],
                                params["layer_0"]["attention"]["query"])
  np.testing.assert_array_equal(upcycled["embed"]["embedding"], params["embed"]["embedding"])


def test_the_transition_keeps_moments_of_copied_params_and_zeroes_the_new_ones():
  target = moe(moe_dispatch="dropless")
  tx = optax.adamw(1e-3)
  params = trained_like(DENSE)
  opt_state = jax.tree.map(lambda x: x + 1.0, tx.init(params))  # Non-zero moments.
  state = TrainState(step=jnp.array(5), params=params, opt_state=opt_state, method_state={})
  ctx = growth_ctx(DENSE, target, keep=True)
  new = upcycle_transition(state, ctx)
  mu = new.opt_state[0].mu
  np.testing.assert_array_equal(mu["layer_0"]["attention"]["key"],
                                opt_state[0].mu["layer_0"]["attention"]["key"])
  assert float(jnp.abs(mu["layer_0"]["mlp"]["gate"]).max()) == 0.0
  assert float(jnp.abs(mu["layer_0"]["mlp"]["router"]).max()) == 0.0
  assert logit_error(params, DENSE, new.params, target) < EXACT


@pytest.mark.parametrize("target, granularity, match", [
    (moe(), 3, "granularity=3 must divide"),
    (moe(num_experts=8, experts_per_token=1, expert_mlp_dim=24), 2, "multiple of it"),
    (moe(num_experts=8), 2, "set the MoE model's ModelConfig.expert_mlp_dim = 24"),
    (moe(d_model=64), 1, r"also changes \['d_model'\]"),
    (DENSE, 1, "has no MoE layer"),
    (moe(), 1, "there is no dense MLP to copy"),
])
def test_what_upcycling_cannot_do_is_one_line(target, granularity, match):
  source = moe() if match == "there is no dense MLP to copy" else DENSE
  with pytest.raises(UserError, match=match):
    upcycle_params(trained_like(source), source, target, init_params(target, jax.random.key(0)),
                   granularity)


def test_a_first_stage_upcycles_a_run_trained_elsewhere(tmp_path, small_text_file):
  """No learning-rate-0 load stage: the MoE stage restores the dense run and its transition
  upcycles it; its baseline evaluation equals the dense run's final one."""
  dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
  trainer.run(str(dense_dir), [tiny_stage(small_text_file, 2)], trainer=QUIET)
  target = dataclasses.replace(TINY, moe_layers="every_other", num_experts=4,
                               experts_per_token=2, moe_dispatch="dropless")
  restore = RestoreConfig(path=str(dense_dir), model=TINY)
  moe_stage = tiny_stage(small_text_file, 2, model=target, transition=[upcycle_transition],
                         restore_from=restore)
  trainer.run(str(moe_dir), [moe_stage], trainer=QUIET)
  dense_final = [r for r in metric_records(dense_dir) if "eval/loss" in r][-1]
  moe_start = [r for r in metric_records(moe_dir) if "eval/loss" in r][0]
  assert moe_start["step"] == 0
  np.testing.assert_allclose(moe_start["eval/loss"], dense_final["eval/loss"], atol=EXACT)
  assert any("expert_load" in key for r in metric_records(moe_dir) for key in r)
  # Without RestoreConfig.model the source is taken to be the stage's own (MoE) model: refused
  # before anything is written, saying what to bind.
  unbound = dataclasses.replace(moe_stage, restore_from=RestoreConfig(path=str(dense_dir)))
  with pytest.raises(UserError, match="bind RestoreConfig.model to the model the source holds"):
    trainer.run(str(tmp_path / "refused"), [unbound], trainer=QUIET)
  assert not (tmp_path / "refused").exists()


UPCYCLING_GIN = """
run.stages = [@dense/Stage(), @moe/Stage()]
dense/Stage.num_steps = 4
moe/Stage.num_steps = 8
moe/Stage.transition = [@upcycle]
moe/ModelConfig.moe_layers = 'every_other'
moe/ModelConfig.num_experts = 4
moe/ModelConfig.experts_per_token = 2
"""


@pytest.mark.slow  # A minute: a subprocess killed and resumed; .ci/run runs the slow tests.
def test_an_upcycled_run_killed_with_sigkill_resumes_bitwise(tmp_path, small_text_file,
                                                             monkeypatch):
  got = gin_run_resumes_bitwise(tmp_path, small_text_file, UPCYCLING_GIN, kill_after=7,
                                final_step=12, monkeypatch=monkeypatch)
  assert got["params"]["layer_1"]["mlp"]["gate"].shape[0] == 4  # The MoE stage's experts.
