"""The stage machinery methods plug into: whole-state transitions (composed, shape-checked,
jitted), method state (sharded, checkpointed, restored), step hooks (params for the loss,
auxiliary losses through the micro-batch scan, after-update), the run-level evaluation config
(forgetting) and the compute ledger."""

import dataclasses
import re
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_method
from conftest import REPO_ROOT
from jaxlm import parallel
from jaxlm.training import preflight
from jaxlm.training import trainer
from jaxlm.errors import UserError
from jaxlm.evaluation.schedule import EvalConfig
from jaxlm.methods import Method
from jaxlm.model import token_losses
from jaxlm.optim.schedules import warmup_constant
from jaxlm.checkpointing.restore import RestoreConfig, restore_into
from jaxlm.training.stages import hand_over, transition_context
from jaxlm.methods.transition import transition
from jaxlm.training.train_step import (abstract_state, init_state, make_train_step, sharded_init,
                              state_shardings)
from jaxlm.tree_names import flatten_names
from helpers import (QUIET, TINY, assert_same_saved_state, cli_run_args, kill_once_logged,
                     last_logged_step, mesh_and_rules, metric_records, random_batch, raw_state,
                     resume, run_to_the_end, tiny_data, tiny_stage)

WIDE = dataclasses.replace(TINY, mlp_dim=256)


def _sgd(learning_rate):
  return optax.sgd(learning_rate)


def _constant_sgd_stage(path, **overrides):
  return tiny_stage(path, 4, optimizer=_sgd, schedule=lambda n: warmup_constant(n, peak_lr=0.1,
                                                                            warmup_steps=0),
                **overrides)


def _one_step(stage, microbatches=1):
  mesh, rules = mesh_and_rules()
  with jax.set_mesh(mesh):
    shardings = state_shardings(stage, mesh, rules)
    state = sharded_init(stage, shardings, jax.random.key(0))
    before = jax.device_get(state)
    step = make_train_step(stage, shardings, parallel.batch_sharding(mesh, rules), microbatches)
    state, metrics = step(state, random_batch(stage))
  return before, jax.device_get(state), jax.device_get(metrics)


# --- Step hooks -------------------------------------------------------------------------------

L2 = 1e-3


def _l2_method():
  """An auxiliary loss on the params (a stand-in for MoE load balancing)."""
  return Method("l2", aux_losses=lambda params, _, intermediates: {
      "penalty": L2 * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))})


def test_an_aux_loss_is_added_to_the_gradient_logged_and_split_over_microbatches(
    small_text_file):
  plain = _constant_sgd_stage(small_text_file)
  with_l2 = dataclasses.replace(plain, methods=(_l2_method(),))
  before, after_plain, _ = _one_step(plain)
  _, after_l2, metrics = _one_step(with_l2)
  _, after_l2_split, metrics_split = _one_step(with_l2, microbatches=2)
  # SGD: the aux loss adds lr * 2 * L2 * p to the plain update of every parameter.
  for name, p in flatten_names(before.params).items():
    np.testing.assert_allclose(flatten_names(after_l2.params)[name],
                               flatten_names(after_plain.params)[name] - 0.1 * 2 * L2 * p,
                               rtol=1e-4, atol=1e-7, err_msg=name)
  penalty = L2 * sum(float(np.sum(np.square(p))) for p in jax.tree.leaves(before.params))
  assert metrics["train/aux/l2/penalty"] == pytest.approx(penalty, rel=1e-5)
  # Two micro-batches: the same update (float summation order aside) and the same mean aux loss.
  for name, p in flatten_names(after_l2.params).items():
    np.testing.assert_allclose(flatten_names(after_l2_split.params)[name], p, rtol=1e-4,
                               atol=1e-6, err_msg=name)
  assert metrics_split["train/aux/l2/penalty"] == pytest.approx(penalty, rel=1e-5)


def _without_mlp_up(params):
  layer = params["layer_0"]
  return {**params, "layer_0": {**layer, "mlp": {**layer["mlp"],
                                                 "up": jnp.zeros_like(layer["mlp"]["up"])}}}


def test_params_for_loss_decides_what_the_loss_sees(small_text_file):
  """A hook that zeroes layer 0's MLP 'up' weight for the loss (as a mask would): the loss is
  the masked model's, the masked weight gets no gradient (SGD leaves it as it was) and the rest
  trains."""
  masked = Method("mask_up", params_for_loss=lambda params, _, step: _without_mlp_up(params))
  stage = _constant_sgd_stage(small_text_file, methods=(masked,))
  before, after, metrics = _one_step(stage)
  np.testing.assert_array_equal(after.params["layer_0"]["mlp"]["up"],
                                before.params["layer_0"]["mlp"]["up"])
  assert not np.array_equal(after.params["lm_head"], before.params["lm_head"])
  batch = random_batch(stage)
  expected = jnp.mean(token_losses(_without_mlp_up(before.params), stage.model, batch))
  assert metrics["train/loss"] == pytest.approx(float(expected), rel=1e-5)


# --- Transitions and method state -------------------------------------------------------------

@transition("test_double")
def _double(state, ctx):
  return state.replace(params=jax.tree.map(lambda p: 2 * p, state.params))


@transition("test_add_one")
def _add_one(state, ctx):
  return state.replace(params=jax.tree.map(lambda p: p + 1, state.params))


def test_transitions_compose_in_list_order_and_methods_get_their_state(small_text_file):
  first = tiny_stage(small_text_file, 2, name="a")
  second = tiny_stage(small_text_file, 2, name="b", transition=[_double, _add_one],
                  methods=(toy_method.toy_fixed_mask(),))
  assert second.transition == (_double, _add_one)
  state = init_state(first, jax.random.key(1))
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # Not fresh.
  out = hand_over(state, transition_context(first, second, jax.random.key(2)))
  for name, p in flatten_names(state.params).items():
    np.testing.assert_array_equal(flatten_names(out.params)[name], 2 * p + 1)
  # The new method's state was initialised; the optimizer state is fresh.
  assert sorted(out.method_state) == ["toy_mask"]
  jax.tree.map(np.testing.assert_array_equal, out.opt_state,
               second.make_optimizer().init(out.params))


def test_a_transition_that_gives_the_wrong_shape_is_named_before_training(small_text_file):
  first = tiny_stage(small_text_file, 2, name="small")
  wrong = tiny_stage(small_text_file, 2, name="wide", model=WIDE, transition=_double)
  with pytest.raises(UserError, match=r"stage 'wide': 'params/layer_0/mlp/down' is \(192, 64\) "
                                      r"after the 'test_double' transition but \(256, 64\) by "
                                      r"stage 'wide'"):
    preflight.check_transitions([first, wrong])
  preflight.check_transitions([first, dataclasses.replace(wrong,
                                                          transition=toy_method.widen_mlp)])


def test_unknown_or_malformed_transitions_and_methods_are_refused(small_text_file):
  with pytest.raises(UserError, match=re.escape(
      "names 'grow_sideways'; give the transition itself, unevaluated: "
      "Stage.transition = [@grow_sideways]")):
    tiny_stage(small_text_file, 2, transition=[_double, "grow_sideways"])
  with pytest.raises(UserError, match=r"must be transitions such as \[@grow_width\]"):
    tiny_stage(small_text_file, 2, transition=[len])
  with pytest.raises(UserError, match="must be Methods with distinct names"):
    tiny_stage(small_text_file, 2, methods=(toy_method.toy_fixed_mask(), toy_method.toy_fixed_mask()))
  with pytest.raises(UserError, match="must be Methods"):
    tiny_stage(small_text_file, 2, methods=("toy_mask",))


def test_method_state_is_sharded_by_its_logical_axes(small_text_file):
  stage = tiny_stage(small_text_file, 2, model=WIDE, methods=(toy_method.toy_fixed_mask(),))
  mesh, rules = mesh_and_rules()
  shardings = state_shardings(stage, mesh, rules)
  masks = shardings.method_state["toy_mask"]
  assert set(masks) == {"layer_0", "layer_1"}
  for name, sharding in masks.items():
    assert sharding.spec == shardings.params[name]["mlp"]["up"].spec
  # The pre-flight disk estimate counts it: the abstract state holds one mask per MLP.
  assert flatten_names(abstract_state(stage).method_state).keys() == {
      "toy_mask/layer_0", "toy_mask/layer_1"}


def test_the_widen_and_mask_method_trains_checkpoints_and_restores(tmp_path, small_text_file):
  """Two stages through trainer.run: the widening is function-preserving (stage 2's baseline
  evaluation, before the mask's first update, equals stage 1's last), the mask holds after
  every update, the mask is in the checkpoint, and another run restores it with restore_into."""
  stages = [tiny_stage(small_text_file, 4, name="small"),
            tiny_stage(small_text_file, 4, name="wide", model=WIDE, transition=toy_method.widen_mlp,
                   methods=(toy_method.toy_fixed_mask(),))]
  result = trainer.run(str(tmp_path / "run"), stages, trainer=QUIET,
                       evaluation=EvalConfig(every=100))
  evals = [(r["step"], r["eval/loss"]) for r in metric_records(tmp_path / "run") if "eval/loss" in r]
  # Each stage's baseline (stage 2's at step 4, after stage 1's last evaluation) and its end.
  assert [step for step, _ in evals] == [0, 4, 4, 8]
  # The same function up to float summation order over the wider hidden dimension.
  assert evals[2][1] == pytest.approx(evals[1][1], rel=1e-5)
  assert result["train/toy_mask/density"] == 0.5
  saved = raw_state(tmp_path / "run", 8)
  masks = saved["method_state"]["toy_mask"]
  assert toy_method.is_masked_to_zero(saved["params"], masks)
  # Restored into a fresh state of the same stage: params and the method's masks load.
  mesh, rules = mesh_and_rules()
  with jax.set_mesh(mesh):
    fresh = sharded_init(stages[1], state_shardings(stages[1], mesh, rules), jax.random.key(7))
    restored, report = restore_into(RestoreConfig(str(tmp_path / "run")), fresh,
                                    stages[1].make_optimizer(), str(tmp_path))
  for name in masks:
    np.testing.assert_array_equal(restored.method_state["toy_mask"][name], masks[name])
  assert not report.created


# --- Evaluation across stages and the compute ledger ------------------------------------------

def test_forgetting_is_logged_against_each_stage_baseline_with_the_compute_ledger(
    tmp_path, small_text_file):
  """Stage 2 trains on another text only; the first text stays an eval domain (EvalConfig
  .domains), evaluated densely near the stage start."""
  from jaxlm.data.sources import text_files  # pylint: disable=import-outside-toplevel
  other = tmp_path / "other.txt"
  other.write_text(open(json.__file__, encoding="utf-8").read() * 2, encoding="utf-8")
  first = tiny_stage(small_text_file, 4, name="first")
  second = tiny_stage(small_text_file, 6, name="second", data=tiny_data(
      other, source=lambda: text_files(str(other), name="other")))
  evaluation = EvalConfig(every=100, domains=[text_files(str(small_text_file), name="text")],
                          near_start_every=1, near_start_steps=2)
  trainer.run(str(tmp_path / "run"), [first, second], trainer=QUIET, evaluation=evaluation)
  records = metric_records(tmp_path / "run")
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 1, 2, 4, 4, 5, 6, 10]
  # The first stage follows nothing: its evaluations log no forgetting.
  assert not any(k.startswith("forgetting/") for r in evals[:4] for k in r)
  baseline = evals[4]  # Stage 2's, before its first update.
  assert {"eval/text/loss", "eval/other/loss"} <= set(baseline)
  for r in evals[5:]:
    assert {k for k in r if k.startswith("forgetting/")} == {
        "forgetting/text", "forgetting/other", "forgetting/all"}
    assert r["forgetting/text"] == pytest.approx(r["eval/text/loss"] - baseline["eval/text/loss"],
                                                 abs=1e-12)
  # Every record carries the compute so far; each stage counts its own tokens per step.
  tokens_per_step = 4 * 64
  assert all("total/flops" in r and "total/tokens" in r for r in records)
  last = records[-1]
  assert last["step"] == 10 and last["total/tokens"] == 10 * tokens_per_step
  at_4 = [r for r in records if r["step"] == 4 and "train/loss" in r][0]
  assert last["total/flops"] == pytest.approx(at_4["total/flops"] * 10 / 4, rel=1e-12)


# --- Kill -9 and resume with the toy method, through the CLI ----------------------------------

TOY_GIN = """
import toy_method
run.stages = [@small/Stage(), @wide/Stage()]
small/Stage.num_steps = 4
wide/Stage.num_steps = 10
wide/Stage.transition = [@toy_widen_mlp]
wide/Stage.methods = [@toy_fixed_mask()]
wide/ModelConfig.mlp_dim = 512
"""


@pytest.mark.slow  # A minute: a subprocess killed and resumed; .ci/run runs the slow tests.
def test_the_toy_method_is_killed_in_its_stage_and_resumes_bitwise(tmp_path, small_text_file,
                                                                   monkeypatch):
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(TOY_GIN, encoding="utf-8")
  monkeypatch.chdir(REPO_ROOT)  # quick_run_args name the experiment relative to the repository.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # So the gin file can `import toy_method`.
      [str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
  reference = tmp_path / "reference"
  run_to_the_end(cli_run_args(reference, small_text_file, gin_file))

  killed = tmp_path / "killed"
  kill_once_logged(cli_run_args(killed, small_text_file, gin_file), killed, 9)
  assert 4 < last_logged_step(killed) < 14  # It died in the method's stage.
  resume(cli_run_args(killed, small_text_file, gin_file))
  got = assert_same_saved_state(reference, killed, 14)
  assert toy_method.is_masked_to_zero(got["params"], got["method_state"]["toy_mask"])
