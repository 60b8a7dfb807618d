"""SLTrain (2406.02214; jaxlm/model/sparse_plus_low_rank.py): block matrices stored as a
low-rank product plus a sparse matrix on a fixed support, formed inside the step only, and the
`sltrain_to_dense` transition that hands the model to a dense stage."""

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import EXACT, QUIET, TINY, growth_ctx, logit_error, metric_records, tiny_stage, \
    trained_like
from jaxlm.errors import UserError
from jaxlm.interop.hf_export import export_hf
from jaxlm.methods.growth.transitions import grow_width_transition
from jaxlm.methods.sparsity.methods import static_sparsity
from jaxlm.methods.sparsity.sltrain import dense_params, sltrain_to_dense
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.anatomy import anatomy
from jaxlm.model.sparse_plus_low_rank import (FactoredWeight, Support, factored_einsum, form_weight,
                                              support_indices)
from jaxlm.optim.matrix_optimizers import galore
from jaxlm.optim.optimizers import decay_matrices_only
from jaxlm.training import trainer
from jaxlm.training.memory import support_bytes
from jaxlm.training.stages import hand_over
from jaxlm.training.train_step import TrainState

SLTRAIN = dataclasses.replace(TINY, parameterization="sltrain", sltrain_rank=8, sltrain_alpha=16.0,
                              sltrain_density=0.05)
DENSE = dataclasses.replace(TINY)


def test_each_block_matrix_is_two_factors_and_values_on_a_fixed_sorted_support():
  params = init_params(SLTRAIN, jax.random.key(0))
  parts = anatomy(SLTRAIN)
  stored = [p for p in parts if p.stored == "sltrain"]
  assert {p.kind for p in stored} == {"attention.query", "attention.key", "attention.value",
                                     "attention.out", "mlp.gate", "mlp.up", "mlp.down"}
  assert parts.one("embedding").stored == parts.one("head").stored == "dense"
  up = parts["layer_1/mlp/up"]
  assert up.shape == (64, 192) and up.axes == ("embed", "mlp")
  factors = up.stored_in(params)
  assert factors["lowrank_in"].shape == (64, 8) and factors["lowrank_out"].shape == (8, 192)
  assert factors["values"].shape == (int(0.05 * 64 * 192),)
  assert not np.any(factors["lowrank_out"])  # B = 0: W starts as S.
  bound = 1 / math.sqrt(64)
  assert 0 < float(jnp.abs(factors["values"]).max()) <= bound
  query = parts["layer_0/attention/out"].stored_in(params)  # [heads, head_dim] read: 64 inputs.
  assert query["lowrank_in"].shape == (4, 16, 8) and query["lowrank_out"].shape == (8, 64)
  support = Support(0, "layer_1/mlp/up", 64 * 192, int(0.05 * 64 * 192))
  indices = support.indices
  assert np.all(np.diff(indices) > 0) and 0 <= indices[0] and indices[-1] < 64 * 192
  np.testing.assert_array_equal(indices, Support(0, "layer_1/mlp/up", 64 * 192,
                                                 support.count).indices)
  assert not np.array_equal(indices, Support(0, "layer_0/mlp/up", 64 * 192,
                                             support.count).indices)
  assert not np.array_equal(indices, Support(1, "layer_1/mlp/up", 64 * 192,
                                             support.count).indices)
  # The indices are constants of the step, not params; memory accounting counts them.
  assert support_bytes(SLTRAIN) == 4 * sum(int(0.05 * math.prod(p.shape)) for p in stored)
  assert support_bytes(DENSE) == 0


def _factors(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return FactoredWeight(jax.random.normal(keys[0], (6, 3)),
                        jax.random.normal(keys[1], (3, 5, 2)),
                        jax.random.normal(keys[2], (9,)))


def test_the_formed_weight_is_the_formula_and_its_gradients_are_autodiffs():
  factors, support = _factors(), Support(0, "w", 60, 9)
  dense = np.asarray(factors.lowrank_in) @ np.asarray(factors.lowrank_out).reshape(3, 10) * 0.5
  dense = dense.reshape(-1)
  dense[support.indices] += np.asarray(factors.values)
  np.testing.assert_allclose(form_weight(factors, support, 0.5), dense.reshape(6, 5, 2),
                             rtol=1e-6)
  x = jax.random.normal(jax.random.key(4), (4, 6))
  ours = lambda x, f: jnp.sum(jnp.sin(factored_einsum("bd,dhk->bhk", support, 0.5, x, f)))
  plain = lambda x, f: jnp.sum(jnp.sin(jnp.einsum("bd,dhk->bhk", x, form_weight(f, support, 0.5))))
  # The same operations in the same order, so the same float32 results (1e-6: fusion may differ).
  for a, b in zip(jax.tree.leaves(jax.grad(ours, (0, 1))(x, factors)),
                  jax.tree.leaves(jax.grad(plain, (0, 1))(x, factors))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _saved_residual_shapes(loss, *args) -> str:
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(loss, *args)
  return printed.getvalue()


def test_the_backward_pass_forms_w_again_instead_of_keeping_it():
  """What the forward pass saves for the backward one: the factors and activations, never a
  dense matrix (a dense model's step saves every W it multiplies by)."""
  from jaxlm.model.transformer import forward  # pylint: disable=import-outside-toplevel
  tokens = jnp.zeros((2, 8), jnp.int32)
  shapes = {"f32[" + ",".join(map(str, p.shape)) + "]" for p in anatomy(SLTRAIN)
            if p.stored == "sltrain"}
  loss = lambda config: lambda params: jnp.sum(forward(params, config, tokens))
  saved = _saved_residual_shapes(loss(SLTRAIN), init_params(SLTRAIN, jax.random.key(0)))
  assert "lowrank_in" in saved and not any(shape in saved for shape in shapes)
  saved_dense = _saved_residual_shapes(loss(DENSE), init_params(DENSE, jax.random.key(0)))
  assert any(shape in saved_dense for shape in shapes)  # The check can fail.


def test_full_rank_with_zero_s_is_the_dense_layer_holding_the_product():
  """rank = the smaller side, S = 0: the model is the dense model whose matrices are
  (alpha / rank) lowrank_in @ lowrank_out (the paper's W = (alpha / r) B A)."""
  # d_model 64 and 4 kv heads of 16: 64 is every matrix's smaller side.
  full = dataclasses.replace(SLTRAIN, num_kv_heads=4, sltrain_rank=64)
  params = trained_like(full)
  for part in anatomy(full):
    if part.stored == "sltrain":
      factors = part.stored_in(params)
      factors["values"] = jnp.zeros_like(factors["values"])
  dense = {}
  for part in anatomy(full):
    value = part.stored_in(params)
    if part.stored == "sltrain":
      n_in = math.prod(value["lowrank_in"].shape[:-1])
      value = (value["lowrank_in"].reshape(n_in, 64) @ value["lowrank_out"].reshape(64, -1)
               * (16.0 / 64)).reshape(part.shape)
    node = dense
    for key in part.path[:-1]:
      node = node.setdefault(key, {})
    node[part.path[-1]] = value
  assert logit_error(params, full, dense, dataclasses.replace(DENSE, num_kv_heads=4)) < EXACT


def test_low_rank_only_holds_no_sparse_entries():
  low_rank = dataclasses.replace(SLTRAIN, parameterization="low_rank", sltrain_density=0.03)
  params = init_params(low_rank, jax.random.key(0))
  up = params["layer_0"]["mlp"]["up"]
  assert up["values"].shape == (0,) and up["lowrank_in"].shape == (64, 8)
  assert support_bytes(low_rank) == 0 and anatomy(low_rank)["layer_0/mlp/up"].stored == "low_rank"


def test_the_support_is_the_same_in_another_process():
  """A resumed or restored run rebuilds S's support in a new process: it must not depend on
  anything but the seed, the path and the size (not on Python's per-process string hashing)."""
  code = ("import hashlib; from jaxlm.model.sparse_plus_low_rank import support_indices; "
          "print(hashlib.sha256(support_indices(3, 'layer_1/attention/out', 4096, 204)"
          ".tobytes()).hexdigest())")
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
  here = hashlib.sha256(support_indices(3, "layer_1/attention/out", 4096, 204).tobytes())
  assert there == here.hexdigest()


def test_sltrain_to_dense_keeps_the_function_and_zeroes_the_new_moments():
  params = trained_like(SLTRAIN)
  tx = optax.adamw(1e-3)
  opt_state = jax.tree.map(lambda x: x + 1.0, tx.init(params))
  state = TrainState(step=jnp.array(3), params=params, opt_state=opt_state, method_state={})
  new = sltrain_to_dense(state, growth_ctx(SLTRAIN, DENSE, keep=True))
  assert jax.tree.map(jnp.shape, new.params) == jax.tree.map(
      jnp.shape, init_params(DENSE, jax.random.key(0)))
  assert logit_error(params, SLTRAIN, new.params, DENSE) < EXACT
  mu = new.opt_state[0].mu
  np.testing.assert_array_equal(mu["embed"]["embedding"], opt_state[0].mu["embed"]["embedding"])
  assert not np.any(mu["layer_0"]["mlp"]["up"])


@pytest.mark.parametrize("make, match", [
    (lambda: ModelConfig(sltrain_rank=16), "sltrain_rank is set but parameterization='dense'"),
    (lambda: ModelConfig(parameterization="low_rank", sltrain_density=0.1),
     "sltrain_density is set but parameterization='low_rank' does not use it"),
    (lambda: ModelConfig(parameterization="sltrain", sltrain_density=0.0),
     r"sltrain_density must be a number in \(0, 1\)"),
    (lambda: ModelConfig(parameterization="sltrain", sltrain_density=1.0),
     r"sltrain_density must be a number in \(0, 1\)"),
    (lambda: ModelConfig(parameterization="sltrain", sltrain_rank=200), "larger than the "
     "smaller side"),
    (lambda: ModelConfig(parameterization="lora"), "parameterization"),
    (lambda: galore(optax.constant_schedule(1e-3), model=SLTRAIN), "galore acts on dense"),
    (lambda: hand_over(TrainState(jnp.array(0), trained_like(SLTRAIN), {}, {}), growth_ctx(
        SLTRAIN, dataclasses.replace(DENSE, mlp_dim=256), transition=[grow_width_transition])),
     r"transitions \['grow_width'\] follow a stage whose matrices are sltrain factors"),
    (lambda: tiny_stage("unused", 2, model=SLTRAIN, methods=[static_sparsity()]),
     "read the model's matrices, which are sltrain factors"),
    (lambda: export_hf(trained_like(SLTRAIN), SLTRAIN, "/nonexistent/out"),
     "Hugging Face files hold dense matrices.*sltrain_to_dense"),
    (lambda: sltrain_to_dense(TrainState(jnp.array(0), trained_like(SLTRAIN), {}, {}),
                              growth_ctx(SLTRAIN, dataclasses.replace(DENSE, d_model=128))),
     r"also changes \['d_model'\]"),
    (lambda: sltrain_to_dense(TrainState(jnp.array(0), trained_like(DENSE), {}, {}),
                              growth_ctx(DENSE, DENSE)), "is not an SLTrain model"),
])
def test_what_sltrain_cannot_do_is_one_line(make, match):
  with pytest.raises(UserError, match=match):
    make()


def test_weight_decay_reaches_the_sparse_values_but_not_the_norms():
  mask = decay_matrices_only(init_params(SLTRAIN, jax.random.key(0)))
  assert mask["layer_0"]["mlp"]["up"] == {"lowrank_in": True, "lowrank_out": True,
                                          "values": True}
  assert mask["layer_0"]["mlp_norm"]["scale"] is False


def test_an_sltrain_stage_hands_over_to_a_dense_one(tmp_path, small_text_file):
  """Trained with SLTrain, then continued densely: the dense stage's baseline evaluation is the
  SLTrain stage's last one, and the run's records hold the support bytes and smaller params."""
  stages = [tiny_stage(small_text_file, 4, model=SLTRAIN, name="sltrain"),
            tiny_stage(small_text_file, 2, model=DENSE, transition=[sltrain_to_dense],
                       name="dense")]
  trainer.run(str(tmp_path), stages, trainer=QUIET)
  records = metric_records(tmp_path)
  evals = [r for r in records if "eval/loss" in r]
  at_handover = [r["eval/loss"] for r in evals if r["step"] == 4]
  assert len(at_handover) == 2  # The SLTrain stage's final evaluation and the dense baseline.
  np.testing.assert_allclose(at_handover[0], at_handover[1], atol=EXACT)
  memory = [r for r in records if "memory/param_bytes" in r]
  assert memory[0]["memory/support_bytes"] == support_bytes(SLTRAIN) > 0
  assert memory[1]["memory/support_bytes"] == 0
  assert memory[0]["memory/param_bytes"] < memory[1]["memory/param_bytes"]
  assert memory[0]["memory/optimizer_state_bytes"] < memory[1]["memory/optimizer_state_bytes"]
