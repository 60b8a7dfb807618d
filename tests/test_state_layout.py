"""The optimizer state's layout on real optax states (adamw, adafactor, optax.contrib's galore
and muon, raw and as our gin factories `@galore` and `@muon`): every leaf tagged with its param
and relation, and every operation that rewrites optimizer state (growth with kept moments,
RigL's regrow, vocabulary expansion) either working or refused with one line naming the leaf
and the operation."""

import dataclasses
import functools
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxlm.methods.continual.vocab_expansion import (byte_tokenizer_json, expand_vocabulary,
                                             extend_tokenizer_json)
from jaxlm.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer
from jaxlm.errors import UserError
from jaxlm.methods.growth.transitions import grow_depth_transition, grow_width_transition
from jaxlm.model import ModelConfig
from jaxlm.model.anatomy import anatomy
from jaxlm.optim.matrix_optimizers import galore, muon
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.state_layout import state_layout
from jaxlm.methods.sparsity.methods import rigl
from jaxlm.training.stages import Stage, hand_over
from jaxlm.methods.transition import TransitionContext
from jaxlm.training.train_step import abstract_state
from conftest import REPO_ROOT
from helpers import assert_same_saved_state, cli_run_args, kill_once_logged, run_to_the_end

MODEL = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_seq_len=64)
OPTIMIZERS = {
    "adamw": adamw,
    "adafactor": lambda lr: optax.adafactor(lr, min_dim_size_to_factor=8),
    "galore": lambda lr: optax.contrib.galore(lr, rank=4),
    "muon": lambda lr: optax.contrib.muon(lr),
    "@galore": functools.partial(galore, rank=4),  # The blocks' matrices; AdamW on the rest.
    "@muon": muon,
}
# What each operation does with each optimizer's state: None works, else the refusal's leaf.
# Our factories leave the embeddings and the head to AdamW, so vocabulary expansion works.
REFUSED = {
    "grow": {"adamw": None, "adafactor": "v_row", "galore": "mu", "muon": "mu", "@galore": "mu",
             "@muon": "mu"},
    "rigl": {"adamw": None, "adafactor": "v_row", "galore": "mu", "muon": None, "@galore": "mu",
             "@muon": None},
    "vocab": {"adamw": None, "adafactor": "v_row", "galore": "mu", "muon": None, "@galore": None,
              "@muon": None},
}


def _stage(optimizer, model=MODEL, **fields):
  return Stage(num_steps=4, model=model, optimizer=OPTIMIZERS[optimizer], **fields)


def test_each_leaf_is_tagged_with_its_param_and_relation():
  tags = {}
  for name in OPTIMIZERS:
    stage = _stage(name)
    state = abstract_state(stage)
    tags[name] = state_layout(state.opt_state, state.params, stage.make_optimizer())
  assert {leaf.relation for leaf in tags["adamw"] if leaf.param} == {"same"}  # mu and nu.
  assert {leaf.relation for leaf in tags["adamw"] if leaf.param is None} == {"scalar"}
  assert "factored" in {leaf.relation for leaf in tags["adafactor"] if "/v_row/" in leaf.name}
  raw_galore = {leaf.name: leaf for leaf in tags["galore"]}
  projector = next(l for n, l in raw_galore.items() if n.endswith("projector/embed/embedding"))
  assert projector.param == "embed/embedding" and projector.relation == "projected"
  raw_muon = {leaf.relation for leaf in tags["muon"]}
  assert {"same", "scalar", "other"} <= raw_muon  # Momentum, counts, Newton-Schulz coefficients.
  # @galore: a projector and two low-rank moments per block matrix, all "projected" (a
  # projector [embed, 4] of a query [embed, 4 heads, 8] looks factored until doubled), and
  # AdamW's mu and nu for every other param.
  matrices = {part.name for part in anatomy(MODEL).block_matmuls}
  ours = [leaf for leaf in tags["@galore"] if leaf.param]
  assert {leaf.relation for leaf in ours if leaf.param in matrices} == {"projected"}
  assert {leaf.relation for leaf in ours if leaf.param not in matrices} == {"same"}
  assert sorted(leaf.param for leaf in ours if "/projector/" in leaf.name) == sorted(matrices)
  assert len(ours) == 3 * len(matrices) + 2 * (len(_param_names(MODEL)) - len(matrices))
  for layout in tags.values():  # Every leaf tied to a param names a real one.
    assert {leaf.param for leaf in layout if leaf.param} <= _param_names(MODEL)


def _param_names(model):
  return {part.name for part in anatomy(model)}


def _refusal(operation, optimizer, error):
  """One line names the leaf (gin may add its "In call to configurable" line below it, which
  the command line drops)."""
  leaf = REFUSED[operation][optimizer]
  line = str(error).splitlines()[0]
  assert re.search(rf"cannot carry the optimizer state leaf '[^']*{leaf}/|carries whole "
                   rf"param-shaped trees of optimizer state, but the leaf '[^']*{leaf}/", line), line


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("transition", ["grow_width", "grow_depth"])
def test_growth_with_kept_moments_works_or_is_refused_with_one_line(optimizer, transition):
  small = _stage(optimizer)
  large_model = (dataclasses.replace(MODEL, mlp_dim=96) if transition == "grow_width" else
                 dataclasses.replace(MODEL, num_layers=4))
  fn = {"grow_width": grow_width_transition, "grow_depth": grow_depth_transition}[transition]
  large = _stage(optimizer, large_model, transition=fn, keep_optimizer_state=True)
  ctx = TransitionContext(small, large, jax.random.key(0))
  if REFUSED["grow"][optimizer] is None:
    grown = jax.eval_shape(lambda s: hand_over(s, ctx), abstract_state(small))
    assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, abstract_state(large))
  else:
    with pytest.raises(UserError, match=transition) as error:
      jax.eval_shape(lambda s: hand_over(s, ctx), abstract_state(small))
    _refusal("grow", optimizer, error.value)
  # A fresh optimizer state in the large stage works whatever the optimizer.
  fresh = _stage(optimizer, large_model, transition=fn)
  grown = jax.eval_shape(lambda s: hand_over(s, TransitionContext(small, fresh,
                                                                   jax.random.key(0))),
                         abstract_state(small))
  assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, abstract_state(fresh))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_rigl_regrow_works_or_is_refused_with_one_line(optimizer):
  stage = _stage(optimizer, methods=(rigl(density=0.5, update_every=1),))
  state = abstract_state(stage)
  method = stage.methods[0]
  step = lambda s: method.after_update(s, s.params, jnp.int32(1))
  if REFUSED["rigl"][optimizer] is None:
    after = jax.eval_shape(step, state)
    assert jax.tree.map(jnp.shape, after) == jax.tree.map(jnp.shape, state)
  else:
    with pytest.raises(UserError, match="rigl's regrow") as error:
      jax.eval_shape(step, state)
    _refusal("rigl", optimizer, error.value)


@pytest.fixture(scope="module")
def extended_bytes(tmp_path_factory):
  pytest.importorskip("tokenizers")
  path = tmp_path_factory.mktemp("vocab") / "bytes_fr.json"
  path.write_text(extend_tokenizer_json(byte_tokenizer_json(),
                                        ["La maison est grande et belle. " * 50], 30),
                  encoding="utf-8")
  return HuggingFaceTokenizer(path)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_vocabulary_expansion_with_kept_moments_works_or_is_refused(optimizer, extended_bytes):
  small = _stage(optimizer, dataclasses.replace(MODEL, vocab_size=288))
  large = _stage(optimizer, transition=expand_vocabulary, keep_optimizer_state=True)
  ctx = TransitionContext(small, large, jax.random.key(0), ByteTokenizer(), extended_bytes)
  if REFUSED["vocab"][optimizer] is None:
    grown = jax.eval_shape(lambda s: hand_over(s, ctx), abstract_state(small))
    assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, abstract_state(large))
  else:
    with pytest.raises(UserError, match="expand_vocabulary") as error:
      jax.eval_shape(lambda s: hand_over(s, ctx), abstract_state(small))
    _refusal("vocab", optimizer, error.value)


THREE_OPTIMIZERS_GIN = """
import optax_optimizers
run.stages = [@adafactor/Stage(), @galore/Stage(), @muon/Stage()]
adafactor/Stage.num_steps = 6
galore/Stage.num_steps = 6
muon/Stage.num_steps = 6
adafactor/Stage.optimizer = @optax_adafactor
galore/Stage.optimizer = @galore
muon/Stage.optimizer = @muon
galore.rank = 4
galore.update_proj_gap = 3
"""


@pytest.mark.slow  # Five subprocess runs; .ci/run runs the slow tests.
def test_adafactor_galore_and_muon_states_are_killed_and_resume_bitwise(tmp_path,
                                                                        small_text_file,
                                                                        monkeypatch):
  """One run whose three stages (6 steps each) train with adafactor and our gin factories'
  GaLore (its projector refreshed every 3 steps) and Muon, killed with SIGKILL in each stage,
  resumes each time from a checkpoint inside that stage (so with that optimizer's state
  restored) and ends exactly where the run that never stopped ends. adamw has its own kill -9
  tests."""
  gin_file = tmp_path / "three.gin"
  gin_file.write_text(THREE_OPTIMIZERS_GIN, encoding="utf-8")
  monkeypatch.chdir(REPO_ROOT)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # So the gin file can import the factories.
      [str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
  args = lambda model_dir: cli_run_args(model_dir, small_text_file, gin_file)
  run_to_the_end(args(tmp_path / "reference"))
  killed, logs = tmp_path / "killed", []
  for kill_after in (5, 11, 17):  # Checkpoints every 2 steps; stages end at 6, 12, 18.
    logs.append(kill_once_logged(args(killed), killed, kill_after).stderr.read())
  final = subprocess.run(args(killed), capture_output=True, text=True, timeout=300)
  assert final.returncode == 0, final.stderr[-2000:]
  resumed_from = [int(m.group(1)) if (m := re.search(r"resuming from step (\d+)", log)) else None
                  for log in logs + [final.stderr]]
  # Each restart resumed inside the stage it was killed in: 2 or 4, 8 or 10, 14 or 16.
  assert resumed_from[0] is None and [step // 6 for step in resumed_from[1:]] == [0, 1, 2], (
      resumed_from)
  assert all(step % 6 for step in resumed_from[1:]), resumed_from
  assert_same_saved_state(tmp_path / "reference", killed, 18)
