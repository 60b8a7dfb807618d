"""The model's anatomy: a block variant defined only here (a plain GELU MLP with T5-style keys and
its output matrix stored [embed, mlp], i.e. reading its second axis, and a loss of its own) goes
through growth, N:M sparsity, the FLOPs count, subcloning, interop and the train step with no
change to those modules."""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh_and_rules, random_batch
from jaxlm import parallel
from jaxlm.model import flops
from jaxlm.data.pipeline import DataConfig
from jaxlm.errors import UserError
from jaxlm.methods.growth.depth import depth_sources, grow_depth
from jaxlm.methods.growth.subcloning import activation_stats, subclone
from jaxlm.methods.growth.width import exact_norm_eps, grow_width
from jaxlm.interop import export_hf
from jaxlm.interop.hf_import import HFParams
from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.model.anatomy import anatomy
from jaxlm.model.layers import Role, param_with_axes, register_mlp
from jaxlm.model.loss import training_losses
from jaxlm.methods.sparsity.methods import nm_sparsity
from jaxlm.methods.sparsity.topk import nm_mask
from jaxlm.training.stages import Stage
from jaxlm.training.train_step import make_train_step, sharded_init, state_shardings


class GeluMLP(nn.Module):
  """wo_t(gelu(x wi)) with wo_t stored transposed, [embed, mlp]: its input axis is its second."""
  config: ModelConfig
  PARTS: ClassVar[dict] = {"wi": Role("mlp.up", reads=("embed",)),
                           "wo_t": Role("mlp.down", reads=("mlp",))}

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    init, shape = nn.initializers.normal(cfg.init_std), (cfg.d_model, cfg.mlp_dim)
    w_in = param_with_axes(self, "wi", init, shape, ("embed", "mlp"), cfg.param_dtype)
    w_out = param_with_axes(self, "wo_t", init, shape, ("embed", "mlp"), cfg.param_dtype)
    h_BLF = nn.gelu(jnp.einsum("bld,df->blf", x_BLD, w_in))
    self.sow("activations", "mlp", h_BLF)
    self.sow("losses", "hidden_l2", HIDDEN_L2 * jnp.mean(h_BLF ** 2))  # The model's own loss.
    return jnp.einsum("blf,df->bld", h_BLF, w_out)


HIDDEN_L2 = 1e-2
register_mlp("gelu_test", GeluMLP)
VARIANT = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_seq_len=64, mlp="gelu_test")


def _params(config, seed=0):
  """Random params well away from init, so copies and zeros are visible."""
  params = init_params(config, jax.random.key(seed))
  return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape),
                      params)


def _logits(params, config):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)))
  return np.asarray(forward(params, config, tokens))


def test_the_anatomy_names_the_variants_parts_and_their_input_axes():
  parts = anatomy(VARIANT)
  assert [p.kind for p in parts.block_parts(0) if p.path[1] == "mlp"] == ["mlp.up", "mlp.down"]
  assert parts["layer_0/mlp/wo_t"].input_dims == (1,)
  assert parts["layer_0/mlp/wi"].input_dims == (0,)
  assert [p.name for p in parts.residual_writers(1)] == ["layer_1/attention/out",
                                                         "layer_1/mlp/wo_t"]


def test_the_variant_grows_exactly_in_width_and_depth():
  params = _params(VARIANT)
  large = dataclasses.replace(VARIANT, d_model=64, mlp_dim=96, num_heads=8, num_kv_heads=4,
                              norm_eps=exact_norm_eps(VARIANT, 64))
  wide = grow_width(params, VARIANT, large, init_params(large, jax.random.key(5)))
  np.testing.assert_allclose(_logits(wide, large), _logits(params, VARIANT), atol=1e-5, rtol=0)
  deep = dataclasses.replace(VARIANT, num_layers=5)
  inserted = grow_depth(params, depth_sources(2, 5, "interleave"), anatomy(VARIANT),
                        zero_copies=True)
  np.testing.assert_array_equal(_logits(inserted, deep), _logits(params, VARIANT))


def test_nm_masks_run_along_the_variants_true_input_axis():
  method = nm_sparsity(n=2, m=4).for_stage(VARIANT, 10)
  params = _params(VARIANT)
  masks = method.init(params, jax.random.key(0))["masks"]
  assert sorted(masks) == sorted(p.name for p in anatomy(VARIANT).block_matmuls)
  w, mask = params["layer_0"]["mlp"]["wo_t"], np.asarray(masks["layer_0/mlp/wo_t"])
  np.testing.assert_array_equal(mask, nm_mask(w, 2, 4, (1,)))
  assert (mask.reshape(32, 12, 4).sum(axis=-1) == 2).all()  # 2 of every 4 inputs (mlp axis).
  assert not (mask.reshape(8, 4, 48).sum(axis=1) == 2).all()  # Not along the output axis.


def test_flops_count_the_variants_two_matrices():
  d, k, f, v = 32, 8, 48, 64
  attention = d * k * (2 * 4 + 2 * 2)
  assert flops.matmul_params(VARIANT) == 2 * (attention + 2 * d * f) + d * v
  swiglu = dataclasses.replace(VARIANT, mlp="swiglu")
  assert flops.matmul_params(swiglu) == 2 * (attention + 3 * d * f) + d * v


def test_the_variant_subclones():
  params = _params(VARIANT)
  tokens = [np.random.default_rng(i).integers(0, 64, (2, 16)) for i in range(2)]
  small = dataclasses.replace(VARIANT, d_model=16, mlp_dim=24, num_heads=2, num_kv_heads=1,
                              num_layers=1)
  cut = subclone(params, VARIANT, small, activation_stats(params, VARIANT, tokens))
  assert jax.tree.map(np.shape, cut) == jax.tree.map(np.shape, init_params(small,
                                                                           jax.random.key(0)))


def test_interop_refuses_the_variant_with_one_line(tmp_path):
  with pytest.raises(UserError, match=r"^ModelConfig.mlp='gelu_test' has no Hugging Face "
                                      r"Llama-family equivalent"):
    export_hf(_params(VARIANT), VARIANT, str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
  with pytest.raises(UserError, match="ModelConfig.mlp='gelu_test' has no Hugging Face"):
    HFParams(str(tmp_path), VARIANT)


def test_an_unknown_mlp_kind_is_one_line():
  with pytest.raises(UserError, match=r"ModelConfig.mlp='moe' is not an MLP jaxlm knows; "
                                      r"choose one of \['gelu_test', 'swiglu'\]"):
    anatomy(dataclasses.replace(VARIANT, mlp="moe"))


def test_the_models_own_loss_is_trained_and_logged():
  model = dataclasses.replace(VARIANT, vocab_size=256)  # random_batch draws ids below 200.
  stage = Stage(num_steps=200, model=model, data=DataConfig(seq_len=16, batch_size=2))
  mesh, rules = mesh_and_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(stage, mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(0))
    batch = random_batch(stage, rows=2)
    ce_BL, extras = training_losses(state.params, model, batch)
    losses = extras.losses
    _, metrics = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules))(
        state, batch)
  assert sorted(losses) == ["hidden_l2"] and float(losses["hidden_l2"]) > 0
  np.testing.assert_allclose(metrics["train/aux/model/hidden_l2"], losses["hidden_l2"],
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["train/loss"], np.mean(ce_BL), rtol=1e-6)  # CE alone.
