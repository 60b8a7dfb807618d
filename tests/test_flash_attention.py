"""Pallas flash attention (interpret mode on CPU) against the XLA reference, and the impl dispatch.

Both lowerings are checked: 'gpu' (Triton-style: a loop over blocks inside each program) and
'tpu' (Mosaic-style: a sequential grid axis with scratch accumulators). On CPU both run with
interpret=True, which executes the same kernel bodies, index maps and block schedules.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.errors import UserError
from jaxlm import kernels
from jaxlm.kernels import flash_tiles as tiles
from jaxlm.kernels.attention_impls import (choose_attention_impl, pallas_attention,
                                           splash_attention)
from jaxlm.kernels.flash_attention import FlashBlockSizes, flash_attention, make_plan
from jaxlm.masking import MASK_VALUE
from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.model import attention
from jaxlm.model.attention import dot_product_attention, xla_attention


def _documents(length: int, boundaries: list[int], padding: int):
  """Segment ids 1, 2, ... changing at `boundaries`, then `padding` trailing zeros (padding)."""
  ids = np.zeros(length, np.int32)
  edges = [0, *boundaries, length - padding]
  for doc, (start, stop) in enumerate(zip(edges[:-1], edges[1:]), start=1):
    ids[start:stop] = doc
  return ids


def _inputs(seed, batch, length, heads, kv_heads, head_dim, dtype):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, length, heads, head_dim)).astype(dtype)
  k = jax.random.normal(kk, (batch, length, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(kv, (batch, length, kv_heads, head_dim)).astype(dtype)
  do = jax.random.normal(kd, (batch, length, heads, head_dim)).astype(dtype)
  # Row 0: three documents with boundaries off every block edge, then padding (id 0).
  # Row 1: a single document filling the row (no padding, no id 0).
  segments = np.stack([_documents(length, [13, length // 2 + 3], padding=length // 8),
                       _documents(length, [], padding=0)][:batch])
  return q, k, v, jnp.asarray(segments), do


def _value_and_grads(attention_fn, q, k, v, do):
  """(out, dq, dk, dv) for the scalar loss sum(out * do)."""
  out, pullback = jax.vjp(attention_fn, q, k, v)
  return (out, *pullback(do.astype(out.dtype)))


# (lowering, causal, length, heads, kv_heads, head_dim, block sizes). Lengths 64 and 128 are
# multiples of every block; 100 and 200 are not (the kernel pads). Heads / kv_heads = 1, 2, 4.
CASES = [
    ("gpu", True, 64, 2, 2, 16, FlashBlockSizes(16, 16, 16, 16)),
    ("gpu", True, 100, 4, 2, 16, FlashBlockSizes(32, 16, 16, 32)),
    ("gpu", False, 200, 4, 1, 32, FlashBlockSizes(64, 32, 32, 64)),
    ("gpu", True, 200, 4, 1, 24, FlashBlockSizes()),  # Defaults; head_dim 24 is padded to 32.
    ("tpu", True, 100, 4, 1, 16, FlashBlockSizes(32, 16, 32, 16)),
    ("tpu", False, 128, 4, 2, 32, FlashBlockSizes(16, 32, 32, 16)),
    ("tpu", True, 200, 2, 2, 16, FlashBlockSizes(64, 64, 64, 64)),
]


@pytest.mark.parametrize("lowering, causal, length, heads, kv_heads, head_dim, blocks", CASES)
def test_float32_output_and_gradients_match_xla(lowering, causal, length, heads, kv_heads,
                                                 head_dim, blocks):
  q, k, v, segments, do = _inputs(0, 2, length, heads, kv_heads, head_dim, jnp.float32)
  want = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments, causal=causal),
                          q, k, v, do)
  got = jax.jit(lambda q, k, v, do: _value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, segments, causal=causal, block_sizes=blocks,
                                      lowering=lowering), q, k, v, do))(q, k, v, do)
  # float32 throughout; only the summation order differs (blockwise online softmax vs one
  # softmax). Observed differences are <= 2e-6 on values of O(1-10); a masking or indexing bug
  # moves values by O(0.1).
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("lowering", ["gpu", "tpu"])
def test_bfloat16_is_as_accurate_as_the_xla_bfloat16_path(lowering):
  q, k, v, segments, do = _inputs(1, 2, 128, 4, 2, 32, jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  exact = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments), f32(q), f32(k),
                           f32(v), do)
  xla_bf16 = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments), q, k, v, do)
  blocks = FlashBlockSizes(32, 32, 32, 32)
  flash_bf16 = jax.jit(lambda q, k, v, do: _value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, segments, block_sizes=blocks, lowering=lowering),
      q, k, v, do))(q, k, v, do)
  # bfloat16 keeps 8 significant bits, so neither path matches float32 closely; the fair bar is
  # the XLA path on the same bfloat16 inputs. Both round P to bf16 before the PV matmul and
  # round outputs to bf16; the kernel may differ in summation order. Observed kernel/XLA error
  # ratios are 0.7-1.5; we allow 2x plus one bf16 rounding (2^-8) of the largest value.
  for name, e, x, f in zip(("out", "dq", "dk", "dv"), exact, xla_bf16, flash_bf16):
    assert f.dtype == jnp.bfloat16, name
    xla_err = float(jnp.max(jnp.abs(f32(x) - e)))
    flash_err = float(jnp.max(jnp.abs(f32(f) - e)))
    assert flash_err <= 2 * xla_err + 2 ** -8 * float(jnp.max(jnp.abs(e))), (name, flash_err,
                                                                             xla_err)


def test_a_fully_masked_key_block_is_wiped_by_the_online_softmax():
  """Tile arithmetic: a block with no visible key, then a visible one, equals the visible one
  alone, and a row that never sees a key stays finite."""
  rng = np.random.default_rng(0)
  s1, s2 = (jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(2))
  v1, v2 = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(2))
  hidden = jnp.zeros((4, 8), bool)
  visible = jnp.ones((4, 8), bool).at[3].set(False)  # Row 3 sees nothing in either block.
  stats = tiles.initial_stats(4, 1, 16)
  stats = tiles.online_softmax_step(jnp.where(hidden, s1, MASK_VALUE), v1, *stats)
  stats = tiles.online_softmax_step(jnp.where(visible, s2, MASK_VALUE), v2, *stats)
  out, lse = tiles.finish_softmax(*stats)
  want = jax.nn.softmax(s2[:3], axis=-1) @ v2
  np.testing.assert_allclose(out[:3], want, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse[:3, 0], jax.nn.logsumexp(s2[:3], axis=-1), rtol=1e-6)
  assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_lengths_off_the_block_grid_are_padded_and_rows_without_keys_stay_finite():
  # Length 50 with 32-blocks pads to 64; the 14 padded query rows (id 0) see no key at all,
  # since every real key has id 1 and padded keys are masked by position.
  q, k, v, _, do = _inputs(2, 1, 50, 2, 1, 16, jnp.float32)
  segments = jnp.ones((1, 50), jnp.int32)
  blocks = FlashBlockSizes(32, 32, 32, 32)
  assert make_plan(50, 16, causal=True, block_sizes=blocks, lowering="gpu",
                   interpret=True).padded_length == 64
  got = jax.jit(lambda q, k, v, do: _value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, segments, block_sizes=blocks), q, k, v, do))(
          q, k, v, do)
  want = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, segments), q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and np.isfinite(g).all(), name
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("lowering, blocks, match", [
    ("gpu", FlashBlockSizes(block_q=48), "powers of two"),
    ("gpu", FlashBlockSizes(block_k=8), "powers of two"),
    ("tpu", FlashBlockSizes(block_q_bwd=64), "multiples of 128"),
])
def test_block_sizes_the_hardware_cannot_tile_are_a_clear_error(lowering, blocks, match):
  with pytest.raises(UserError, match=match):
    make_plan(1024, 64, causal=True, block_sizes=blocks, lowering=lowering, interpret=False)


def test_blocks_shrink_to_short_sequences():
  plan = make_plan(40, 64, causal=True, block_sizes=FlashBlockSizes(), lowering="gpu",
                   interpret=False)
  assert (plan.block_q, plan.block_k, plan.padded_length) == (64, 64, 64)
  plan = make_plan(300, 64, causal=True, block_sizes=FlashBlockSizes(), lowering="tpu",
                   interpret=False)
  assert (plan.block_q, plan.padded_length) == (384, 384)


@pytest.mark.parametrize("lowering, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_real_hardware(lowering, platform):
  """Lowering to Triton IR / Mosaic MLIR runs here without a device. It catches unsupported
  ops and block shapes, not what only the device compiler checks (layouts, memory limits)."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  args = (shape(1, 1024, 8, 128), shape(1, 1024, 2, 128), shape(1, 1024, 2, 128),
          jax.ShapeDtypeStruct((1, 1024), jnp.int32))
  loss = lambda q, k, v, ids: jnp.sum(flash_attention(
      q, k, v, ids, lowering=lowering, interpret=False).astype(jnp.float32))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") == 3


TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=64, max_seq_len=64)


def test_a_training_step_with_pallas_equals_one_with_xla():
  """Loss and gradients of a packed batch (documents, padding, positions restarting per
  document) through the whole model, attention_impl='pallas' against 'xla'."""
  tokens = jax.random.randint(jax.random.key(3), (2, 40), 3, TINY.vocab_size)
  segments = np.stack([_documents(40, [9, 27], padding=5), _documents(40, [], 0)])
  positions = np.stack([np.arange(40) - np.array([0] * 9 + [9] * 18 + [27] * 8 + [35] * 5),
                        np.arange(40)])
  weights = (segments[:, 1:] > 0).astype(np.float32)  # Padding carries no loss.
  params = init_params(TINY, jax.random.key(0))

  @functools.partial(jax.jit, static_argnums=1)
  def loss_and_grads(p, impl):
    cfg = ModelConfig(**{**TINY.__dict__, "attention_impl": impl})

    def loss_fn(p):
      logits = forward(p, cfg, tokens[:, :-1], positions[:, :-1], segments[:, :-1])
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      return jnp.sum(losses * weights) / jnp.sum(weights)

    return jax.value_and_grad(loss_fn)(p)

  xla_loss, xla_grads = loss_and_grads(params, "xla")
  pallas_loss, pallas_grads = loss_and_grads(params, "pallas")
  # float32 model; attention differs from XLA only in summation order (~1e-6 relative), which
  # the rest of the network carries through without growth.
  np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               pallas_grads, xla_grads)


def test_pallas_in_a_model_config_needs_no_extra_import(monkeypatch):
  # Start as a fresh process would: the kernels module not imported (and put back afterwards).
  monkeypatch.delitem(sys.modules, "jaxlm.kernels.attention_impls")
  monkeypatch.delattr(kernels, "attention_impls")
  q, k, v, segments, _ = _inputs(4, 1, 32, 2, 1, 16, jnp.float32)
  out = dot_product_attention(q, k, v, segments, impl="pallas")
  np.testing.assert_allclose(out, xla_attention(q, k, v, segments), atol=2e-5, rtol=1e-5)
  assert "jaxlm.kernels.attention_impls" in sys.modules
  assert set(attention.ATTENTION_IMPLS) == {"xla", "xla_blocked", "pallas", "cudnn", "splash",
                                            "auto"}


# Each in a fresh interpreter: what one import loads, with nothing imported before it.
@pytest.mark.parametrize("module, never_loaded", [
    ("jaxlm.kernels.attention_impls", "jaxlm.model"),  # Kernels never import the model.
    ("jaxlm.model", "jaxlm.kernels"),  # A model that only runs XLA never imports Pallas.
])
def test_imports_do_not_run_in_a_circle(module, never_loaded):
  script = (f"import sys, {module}\n"
            f"print([m for m in sys.modules if m.startswith({never_loaded!r})])")
  loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip()
  assert loaded == "[]"


def test_the_table_hands_out_functions_by_name():
  """Callers outside the model (tools/bench_attention.py) index the table directly."""
  impls = attention.ATTENTION_IMPLS
  assert impls["pallas"] is pallas_attention and impls["xla"] is xla_attention
  assert "flash" not in impls
  q, k, v, segments, _ = _inputs(8, 1, 16, 2, 1, 16, jnp.float32)
  np.testing.assert_array_equal(impls["auto"](q, k, v, segments),
                                attention.xla_blocked_attention(q, k, v, segments))


@pytest.mark.parametrize("impl, match", [("splash", "needs a TPU"),
                                         ("cudnn", "needs an NVIDIA GPU")])
def test_impls_for_other_hardware_are_a_clear_error_on_cpu(impl, match):
  q, k, v, segments, _ = _inputs(5, 1, 16, 2, 1, 16, jnp.bfloat16)
  with pytest.raises(UserError, match=match):
    dot_product_attention(q, k, v, segments, impl=impl)
  with pytest.raises(UserError, match="not available"):
    dot_product_attention(q, k, v, segments, impl="flash")


def test_auto_is_xla_blocked_on_cpu():
  q, k, v, segments, _ = _inputs(6, 1, 16, 2, 1, 16, jnp.float32)
  assert choose_attention_impl(q) == "xla_blocked"
  np.testing.assert_array_equal(dot_product_attention(q, k, v, segments, impl="auto"),
                                attention.xla_blocked_attention(q, k, v, segments))


def test_splash_glue_matches_xla_in_interpret_mode():
  """Our splash wrapper (layout, 1/sqrt(d) scaling, GQA, segment ids), run by splash's own
  interpret mode; the TPU kernel itself is JAX's."""
  q, k, v, segments, _ = _inputs(7, 2, 128, 4, 2, 32, jnp.float32)
  got = jax.jit(lambda q, k, v: splash_attention(q, k, v, segments, interpret=True))(q, k, v)
  np.testing.assert_allclose(got, xla_attention(q, k, v, segments), atol=2e-5, rtol=1e-5)


def test_block_sizes_are_configurable_from_gin():
  import gin  # pylint: disable=import-outside-toplevel
  gin.parse_config("FlashBlockSizes.block_q = 32\nFlashBlockSizes.block_k_bwd = 16")
  assert FlashBlockSizes() == FlashBlockSizes(block_q=32, block_k_bwd=16)
