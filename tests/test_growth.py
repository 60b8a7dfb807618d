"""Model growth (jaxlm.methods.growth): operators documented as exact keep the logits (float32, random
models and inputs, several shapes including GQA), stacking copies layers exactly, LiGO without
noise is stacking, MSG at mask 0 is the small model and at mask 1 the plain weights, subcloning
to the same size is the identity; growth runs as a stage transition in the trainer; bad input is
one line each.

Tolerance: 1e-5 on logits of magnitude ~1; observed errors are float32 summation-order
differences over the wider contractions, below 2e-6 (printed with -s)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.training import trainer
from jaxlm.errors import UserError
from jaxlm.evaluation.schedule import EvalConfig
from jaxlm.methods.growth import ligo as ligo_lib
from jaxlm.methods.growth import msg as msg_lib
from jaxlm.methods.growth.depth import depth_sources, grow_depth
from jaxlm.methods.growth.subcloning import activation_stats, kept_layers, subclone
from jaxlm.methods.growth.transitions import grow_depth_transition, grow_width_transition
from jaxlm.methods.growth.width import exact_norm_eps, grow_width
from jaxlm.model import ModelConfig, init_params, logical_axes
from jaxlm.model.anatomy import anatomy
from jaxlm.training.stages import Stage, hand_over
from jaxlm.methods.transition import TransitionContext
from jaxlm.training.train_step import init_state
from jaxlm.tree_names import flatten_names
from helpers import (EXACT, QUIET, TINY, check_exact_width_growth, gin_run_resumes_bitwise,
                     growth_ctx, growth_tokens, logit_error, mesh_flags, mesh_result,
                     metric_records, run_mesh_worker, tiny_stage, trained_like, wider)

MHA = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                  mlp_dim=48, head_dim=8, max_seq_len=32)
GQA = dataclasses.replace(MHA, num_kv_heads=2)
TIED = dataclasses.replace(GQA, tie_embeddings=True)


WIDTH_CASES = [
    ("mlp fpi MHA uneven", MHA, dict(mlp_dim=80), {}),
    ("mlp zero", GQA, dict(mlp_dim=80), dict(mlp="zero")),
    ("heads fpi GQA", GQA, dict(num_heads=8, num_kv_heads=4), {}),
    ("heads zero GQA", GQA, dict(num_heads=6, num_kv_heads=3), dict(heads="zero")),
    ("d_model exact tied", TIED, dict(d_model=48), {}),
    ("d_model copy x2", GQA, dict(d_model=64), dict(d_model="copy")),
    ("all exact GQA", GQA, dict(d_model=64, mlp_dim=96, num_heads=8, num_kv_heads=4), {}),
]


@pytest.mark.parametrize("name,small,sizes,modes", WIDTH_CASES, ids=[c[0] for c in WIDTH_CASES])
def test_width_growth_documented_as_exact_keeps_the_logits(name, small, sizes, modes):
  check_exact_width_growth(name, small, sizes, modes)


def test_approximate_width_growth_changes_the_function_as_documented():
  """AKI adds the next layer's units; copying 32 -> 48 residual dimensions weighs the copied
  third twice in the RMS. Both are documented as approximate."""
  params = trained_like(GQA)
  aki_model = wider(GQA, mlp_dim=96)
  aki = grow_width(params, GQA, aki_model, init_params(aki_model, jax.random.key(3)), mlp="aki")
  assert logit_error(params, GQA, aki, aki_model) > 1e-2
  # AKI's new units of layer 0 are layer 1's (divided like FPI copies).
  np.testing.assert_array_equal(aki["layer_0"]["mlp"]["gate"][:, 48:],
                                params["layer_1"]["mlp"]["gate"])
  np.testing.assert_allclose(aki["layer_0"]["mlp"]["down"][48:],
                             params["layer_1"]["mlp"]["down"] / 2, rtol=1e-6)
  uneven = dataclasses.replace(GQA, d_model=48)
  copied = grow_width(params, GQA, uneven, init_params(uneven, jax.random.key(3)),
                      d_model="copy")
  assert logit_error(params, GQA, copied, uneven) > 1e-2


@pytest.mark.parametrize("order,small_layers,large_layers,sources", [
    ("stack", 2, 6, [0, 1, 0, 1, 0, 1]), ("interleave", 2, 6, [0, 0, 0, 1, 1, 1]),
    ("interleave", 3, 4, [0, 0, 1, 2])])
def test_depth_maps(order, small_layers, large_layers, sources):
  assert depth_sources(small_layers, large_layers, order) == sources


def test_stacking_copies_layers_exactly_and_identity_insertion_keeps_the_logits():
  params = trained_like(GQA)
  deep = dataclasses.replace(GQA, num_layers=4)
  stacked = grow_depth(params, depth_sources(2, 4, "stack"), anatomy(GQA))
  for l in range(4):
    for name, leaf in flatten_names(stacked[f"layer_{l}"]).items():
      np.testing.assert_array_equal(leaf, flatten_names(params[f"layer_{l % 2}"])[name])
  for key in ("embed", "final_norm", "lm_head"):
    np.testing.assert_array_equal(flatten_names(stacked[key]).popitem()[1],
                                  flatten_names(params[key]).popitem()[1])
  assert logit_error(params, GQA, stacked, deep) > 1e-2  # Stacking itself is not exact.
  for order in ("stack", "interleave"):
    inserted = grow_depth(params, depth_sources(2, 4, order), anatomy(GQA), zero_copies=True)
    assert logit_error(params, GQA, inserted, deep) == 0.0  # x + 0 is x, bitwise.


def test_ligo_without_noise_is_stacking_and_its_operator_trains():
  params = trained_like(GQA)
  deep = dataclasses.replace(GQA, num_layers=4)
  method = ligo_lib.ligo(source=GQA, noise_std=0.0)
  state = init_state(Stage(model=GQA, num_steps=1), jax.random.key(0)).replace(params=params)
  grown = ligo_lib.ligo_grow(state, growth_ctx(GQA, deep, (method,), ligo_lib.ligo_grow))
  stacked = grow_depth(params, depth_sources(2, 4), anatomy(GQA))
  for name, leaf in flatten_names(stacked).items():
    np.testing.assert_array_equal(flatten_names(grown.params)[name], leaf)
  # With width growth the operator maps every axis ([I; noise] rows), shapes of the large model.
  large = wider(GQA, d_model=64, mlp_dim=96, num_heads=8, num_kv_heads=4, num_layers=4)
  noisy = ligo_lib.ligo_grow(state, growth_ctx(GQA, large, (ligo_lib.ligo(source=GQA),), ligo_lib.ligo_grow))
  assert jax.tree.map(jnp.shape, noisy.params) == jax.tree.map(
      jnp.shape, init_params(large, jax.random.key(0)))
  # after_update: the operator takes a step on J^T grads and the params are rebuilt from it.
  grads = jax.tree.map(jnp.ones_like, noisy.params)
  after = noisy.method_state["ligo"]
  stepped = ligo_lib.ligo(source=GQA).after_update(noisy, grads, 0)
  own = stepped.method_state["ligo"]
  assert not np.array_equal(own["operator"]["depth"]["mlp/up"], after["operator"]["depth"]["mlp/up"])
  rebuilt = ligo_lib.materialize(own["operator"], own["small"], anatomy(GQA))
  for name, leaf in flatten_names(rebuilt).items():
    np.testing.assert_array_equal(flatten_names(stepped.params)[name], leaf)
  for name, leaf in flatten_names(own["small"]).items():  # The small model is frozen.
    np.testing.assert_array_equal(leaf, flatten_names(params)[name])


def test_msg_is_the_small_model_at_mask_0_and_plain_weights_at_mask_1():
  params = trained_like(GQA)
  large = wider(GQA, d_model=64, mlp_dim=96, num_heads=8, num_kv_heads=4, num_layers=3)
  ctx = growth_ctx(GQA, large, (msg_lib.msg(ramp_steps=5),), msg_lib.msg_grow)
  method = ctx.following.methods[0]  # Made for the large model by its stage.
  state = init_state(Stage(model=GQA, num_steps=1), jax.random.key(0)).replace(params=params)
  grown = msg_lib.msg_grow(state, ctx)
  flags = grown.method_state["msg"]
  assert {k: int(v.sum()) for k, v in flags.items()} == {"mlp": 48, "embed": 32, "heads": 4,
                                                         "layers": 1}
  at_0 = method.params_for_loss(grown.params, flags, 0)
  error = logit_error(params, GQA, at_0, large)
  print(f"MSG at mask 0: max |dlogit| {error:.2e}")
  assert error < EXACT
  # Phases one after another: at step 5 only the MLP units are in, the rest still masked.
  partly = method.params_for_loss(grown.params, flags, 5)
  assert logit_error(params, GQA, partly, large) > 1e-4
  np.testing.assert_array_equal(partly["layer_2"]["mlp"]["down"], 0.0)
  at_1 = method.params_for_loss(grown.params, flags, 20)
  for name, leaf in flatten_names(grown.params).items():
    np.testing.assert_array_equal(flatten_names(at_1)[name], leaf)


def test_subcloning_cuts_the_most_active_neurons_and_is_the_identity_at_the_same_size():
  large = dataclasses.replace(GQA, num_layers=4)
  params = trained_like(large)
  tokens = [growth_tokens(large), growth_tokens(large) + 1]
  stats = activation_stats(params, large, tokens)
  same = subclone(params, large, large, stats)
  assert logit_error(params, large, same, large) == 0.0
  small = dataclasses.replace(large, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                              mlp_dim=24)
  cut = subclone(params, large, small, stats)
  assert jax.tree.map(jnp.shape, cut) == jax.tree.map(jnp.shape,
                                                      init_params(small, jax.random.key(0)))
  assert kept_layers(4, 2) == [0, 3] and kept_layers(6, 3) == [0, 2, 5]
  dims = np.sort(np.argsort(-stats["embed"])[:16])
  np.testing.assert_array_equal(cut["embed"]["embedding"], params["embed"]["embedding"][:, dims])
  units = np.sort(np.argsort(-stats["mlp"][3])[:24])  # Small layer 1 is large layer 3.
  np.testing.assert_array_equal(cut["layer_1"]["mlp"]["down"],
                                params["layer_3"]["mlp"]["down"][units][:, dims])


BAD_INPUT = [
    (GQA, dataclasses.replace(GQA, mlp_dim=32), {}, "cannot shrink ModelConfig.mlp_dim 48 -> 32"),
    (GQA, dataclasses.replace(GQA, num_heads=6, num_kv_heads=2), {},
     "keeps the GQA ratio num_heads/num_kv_heads (2)"),
    (GQA, dataclasses.replace(GQA, num_heads=8, num_kv_heads=4, head_dim=4), {},
     "keeps head_dim (8 -> 4)"),
    (GQA, dataclasses.replace(GQA, d_model=64), {}, "needs the large model's ModelConfig.norm_eps"),
    (TIED, dataclasses.replace(TIED, d_model=64), {"d_model": "copy"},
     "cannot grow tied embeddings"),
    (GQA, dataclasses.replace(GQA, vocab_size=128), {}, "keeps ModelConfig.vocab_size"),
    (GQA, GQA, {"mlp": "dup"}, "grow_width.mlp='dup'"),
]


@pytest.mark.parametrize("small,large,modes,message", BAD_INPUT, ids=[b[3] for b in BAD_INPUT])
def test_bad_width_growth_is_one_line(small, large, modes, message):
  state = init_state(Stage(model=small, num_steps=1), jax.random.key(0))
  with pytest.raises(UserError) as error:
    grow_width_transition(state, growth_ctx(small, large), **modes)
  assert message in str(error.value).splitlines()[0]  # What the CLI prints.


@pytest.mark.parametrize("layers,order,message", [
    (1, "stack", "cannot shrink num_layers 2 -> 1"),
    (5, "stack", "num_layers 5 is not a multiple of 2"),
    (4, "zigzag", "grow_depth.order='zigzag'")])
def test_bad_depth_growth_is_one_line(layers, order, message):
  state = init_state(Stage(model=GQA, num_steps=1), jax.random.key(0))
  deep = dataclasses.replace(GQA, num_layers=layers)
  with pytest.raises(UserError) as error:
    grow_depth_transition(state, growth_ctx(GQA, deep), order=order)
  assert message in str(error.value)


def test_growth_transitions_need_their_methods_and_matching_sources():
  state = init_state(Stage(model=GQA, num_steps=1), jax.random.key(0))
  large = wider(GQA, d_model=64)
  # Declared by the transitions: the stage that lists one without its method is refused.
  with pytest.raises(UserError, match="the 'msg_grow' transition needs the msg method"):
    growth_ctx(GQA, large, transition=msg_lib.msg_grow)
  with pytest.raises(UserError, match="the 'ligo_grow' transition needs the ligo method"):
    growth_ctx(GQA, large, transition=ligo_lib.ligo_grow)
  wrong = ligo_lib.ligo(source=dataclasses.replace(GQA, mlp_dim=64))
  with pytest.raises(UserError, match=r"ligo.source.mlp_dim=64 but the previous stage's model"):
    ligo_lib.ligo_grow(state, growth_ctx(GQA, large, (wrong,), ligo_lib.ligo_grow))
  with pytest.raises(UserError, match="msg.ramp_steps=0"):
    msg_lib.msg(ramp_steps=0)


def test_adam_moments_grow_with_the_same_map_when_the_stage_keeps_them():
  small, large = GQA, wider(GQA, mlp_dim=96, num_layers=4)
  before = Stage(model=small, num_steps=1)
  after = Stage(model=large, num_steps=1, transition=(grow_width_transition, grow_depth_transition),
                keep_optimizer_state=True)
  state = init_state(before, jax.random.key(0))
  mu = jax.tree.map(lambda x: jnp.full_like(x, 2.0), state.params)
  state = state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, mu=mu))
  grown = jax.jit(lambda s: hand_over(s, TransitionContext(before, after,
                                                            jax.random.key(1))))(state)
  grown_mu = optax.tree_utils.tree_get(grown.opt_state, "mu")
  assert grown_mu["layer_3"]["mlp"]["up"].shape == (32, 96)
  np.testing.assert_array_equal(grown_mu["layer_3"]["mlp"]["up"], 2.0)  # Copies unscaled.


def test_growth_inside_a_run_preserves_the_function_at_the_transition(tmp_path, small_text_file):
  """trainer.run: a small stage, then exact width growth and identity insertion: the large
  stage's baseline evaluation equals the small stage's last one."""
  large = dataclasses.replace(TINY, d_model=128, mlp_dim=384, num_heads=8, num_kv_heads=4,
                              head_dim=16, num_layers=4, norm_eps=exact_norm_eps(TINY, 128))
  small = dataclasses.replace(TINY, head_dim=16)
  stages = [tiny_stage(small_text_file, 4, name="small", model=small),
            tiny_stage(small_text_file, 4, name="large", model=large,
                   transition=(grow_width_transition, grow_depth_transition))]
  import gin  # pylint: disable=import-outside-toplevel
  with gin.unlock_config():
    gin.bind_parameter("grow_depth.zero_copies", True)
  try:
    trainer.run(str(tmp_path / "run"), stages, trainer=QUIET, evaluation=EvalConfig(every=100))
  finally:
    gin.clear_config()
  evals = [(r["step"], r["eval/loss"]) for r in metric_records(tmp_path / "run") if "eval/loss" in r]
  assert [step for step, _ in evals] == [0, 4, 4, 8]
  assert evals[2][1] == pytest.approx(evals[1][1], rel=1e-6)
  assert evals[3][1] < evals[2][1]  # And the grown model trains.


# --- Through the CLI: killed right after growth, and sharded on 8 devices ----------------------

GROWTH_GIN = """
run.stages = [@small/Stage(), @large/Stage()]
small/Stage.num_steps = 4
large/Stage.num_steps = 8
ModelConfig.head_dim = 16
small/ModelConfig.d_model = 64
small/ModelConfig.num_heads = 4
small/ModelConfig.num_kv_heads = 4
small/ModelConfig.num_layers = 2
small/ModelConfig.mlp_dim = 192
large/ModelConfig.d_model = 128
large/ModelConfig.num_heads = 8
large/ModelConfig.num_kv_heads = 8
large/ModelConfig.num_layers = 4
large/ModelConfig.mlp_dim = 256
large/ModelConfig.norm_eps = 5e-6
large/Stage.transition = [@msg_grow]
large/Stage.methods = [@msg()]
msg.ramp_steps = 1
"""


@pytest.mark.slow  # A minute: a subprocess killed and resumed; .ci/run runs the slow tests.
def test_a_run_killed_just_after_growth_resumes_bitwise(tmp_path, small_text_file, monkeypatch):
  got = gin_run_resumes_bitwise(tmp_path, small_text_file, GROWTH_GIN, kill_after=5,
                                final_step=12, monkeypatch=monkeypatch)
  assert set(got["method_state"]) == {"msg"}


@pytest.mark.slow  # A minute (two 4-run subprocesses); .ci/run runs the slow tests.
def test_grown_params_carry_their_logical_axes_and_train_sharded_on_8_devices(
    tmp_path, small_text_file):
  """The same growth run (exact width + stacking with the Adam moments grown and kept, then
  MSG) on one device and on a 2x2x2 mesh: the same losses; grown leaves have the large
  model's logical axes (so the next stage's shardings place them)."""
  large = wider(GQA, d_model=64, mlp_dim=96, num_heads=8, num_kv_heads=4, num_layers=4)
  state = init_state(Stage(model=GQA, num_steps=1), jax.random.key(0))
  ctx = growth_ctx(GQA, large, transition=(grow_width_transition, grow_depth_transition))
  grown = grow_depth_transition(grow_width_transition(state, ctx), ctx)
  assert jax.tree.structure(grown.params) == jax.tree.structure(logical_axes(large))
  gin_file = tmp_path / "growth.gin"
  gin_file.write_text(GROWTH_GIN.replace("large/Stage.num_steps = 8", "large/Stage.num_steps = 6")
                      .replace("msg.ramp_steps = 1\n", "")
                      + "large/Stage.keep_optimizer_state = True\n", encoding="utf-8")
  # The "grow" run drops the msg method, so its ramp is a default both runs share.
  flags = [f"--gin_file={gin_file}", "--gin.warmup_cosine.warmup_steps=1",
           "--gin_defaults=msg.ramp_steps = 1"]
  grow = flags + ["--gin.large/Stage.transition=[@grow_width, @grow_depth]",
                  "--gin.large/Stage.methods=[]"]
  one = run_mesh_worker(tmp_path / "one", small_text_file, 1, {
      "grow": grow + mesh_flags(1, 1, 1), "msg": flags + mesh_flags(1, 1, 1)})
  eight = run_mesh_worker(tmp_path / "eight", small_text_file, 8, {
      "grow": grow + mesh_flags(2, 2, 2), "msg": flags + mesh_flags(2, 2, 2)})
  single, many = mesh_result(one), mesh_result(eight)
  for name in ("grow", "msg"):
    assert len(single[name]) == 10
    np.testing.assert_allclose(many[name], single[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow  # Two trainer runs; .ci/run runs the slow tests.
def test_a_first_stage_grows_another_runs_checkpoint(tmp_path, small_text_file):
  """Another run's small model, restored by the first stage (RestoreConfig.model: what the
  source holds), is grown by that stage's transition (identity insertion), with no
  learning-rate-0 "load" stage: the large stage starts at exactly the other run's final
  evaluation."""
  import gin  # pylint: disable=import-outside-toplevel
  from jaxlm.checkpointing.restore import RestoreConfig  # pylint: disable=import-outside-toplevel
  trainer.run(str(tmp_path / "small"), [tiny_stage(small_text_file, 4, model=TINY)], trainer=QUIET,
              evaluation=EvalConfig(every=100))
  deep = tiny_stage(small_text_file, 2, name="deep", model=dataclasses.replace(TINY, num_layers=4),
                    transition=grow_depth_transition,
                    restore_from=RestoreConfig(str(tmp_path / "small"), model=TINY))
  with gin.unlock_config():
    gin.bind_parameter("grow_depth.zero_copies", True)
  trainer.run(str(tmp_path / "grown"), [deep], trainer=QUIET, evaluation=EvalConfig(every=100))
  small_final = [r["eval/loss"] for r in metric_records(tmp_path / "small") if "eval/loss" in r][-1]
  grown = [(r["step"], r["eval/loss"]) for r in metric_records(tmp_path / "grown") if "eval/loss" in r]
  assert [step for step, _ in grown] == [0, 2]
  assert grown[0][1] == small_final
