"""The decoder: causal and document masking, GQA, RoPE, logical axes, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, count_params, forward, init_params, logical_axes
from jaxlm.model.attention import xla_attention

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_seq_len=64)
LOGICAL_NAMES = {"batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab",
                 "expert", "layers"}


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def _tokens(seed, shape=(2, 16)):
  return jax.random.randint(jax.random.key(seed), shape, 3, CFG.vocab_size)


def test_changing_future_tokens_never_changes_earlier_logits(params):
  tokens = _tokens(1)
  base = forward(params, CFG, tokens)
  for t in (1, 7, 15):
    changed = tokens.at[:, t:].set((tokens[:, t:] + 5) % CFG.vocab_size)
    logits = forward(params, CFG, changed)
    # Masked scores are replaced (not added to), so earlier positions see identical numbers.
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(base[:, :t]))
    assert not np.allclose(logits[:, t:], base[:, t:])


def test_attention_never_crosses_a_document_boundary(params):
  a, b = _tokens(2, (1, 6)), _tokens(3, (1, 10))
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  logits = forward(params, CFG, packed, positions, segments)
  # Changing document A leaves document B's logits bit-identical.
  other_a = (a + 11) % CFG.vocab_size
  logits_other = forward(params, CFG, jnp.concatenate([other_a, b], axis=1), positions, segments)
  np.testing.assert_array_equal(np.asarray(logits[:, 6:]), np.asarray(logits_other[:, 6:]))
  # And B inside the pack equals B on its own (different shapes, so float32 rounding differs:
  # 1e-5 is ~100x the observed difference and far below any real leak, which moves logits ~1e-1).
  alone = forward(params, CFG, b)
  np.testing.assert_allclose(np.asarray(logits[:, 6:]), np.asarray(alone), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (2, 8, 4, 16))
  k, v = jax.random.normal(kk, (2, 8, 2, 16)), jax.random.normal(kv, (2, 8, 2, 16))
  segments = jnp.array([[1] * 3 + [2] * 5, [1] * 8])
  out = xla_attention(q, k, v, segments, causal=True)
  # Multi-head attention with each KV head repeated for its group of query heads.
  k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  want = xla_attention(q, k_rep, v_rep, segments, causal=True)
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
  # Hand-written softmax reference for one head of the first batch row.
  scores = q[0, :, 1] @ k[0, :, 0].T / 4.0
  allowed = np.tril(np.ones((8, 8), bool)) & (segments[0][:, None] == segments[0][None, :])
  probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  np.testing.assert_allclose(out[0, :, 1], probs @ v[0, :, 0], atol=1e-5, rtol=1e-5)


def test_rope_makes_logits_depend_on_relative_positions_only(params):
  tokens = _tokens(5)
  positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
  shifted = forward(params, CFG, tokens, positions + 37)
  np.testing.assert_allclose(shifted, forward(params, CFG, tokens, positions), atol=1e-4)


def test_every_param_has_logical_axes_matching_its_rank(params):
  axes = logical_axes(CFG)
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  flat_axes = dict(jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert len(flat_params) == len(flat_axes)
  for path, leaf in flat_params:
    spec = flat_axes[path]
    assert len(spec) == leaf.ndim, path
    assert set(spec) <= LOGICAL_NAMES, (path, spec)
  assert axes["layer_0"]["attention"]["key"] == jax.sharding.PartitionSpec(
      "embed", "kv_heads", "head_dim")


def test_parameter_count_matches_the_architecture(params):
  d, f, v, h, g, k = 32, 64, 64, 4, 2, 8
  per_layer = d * k * (2 * h + 2 * g) + 3 * d * f + 2 * d
  assert count_params(params) == 2 * per_layer + 2 * v * d + d
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_tied_embeddings_drop_the_output_head():
  cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
  p = init_params(cfg, jax.random.key(0))
  assert "lm_head" not in p
  assert forward(p, cfg, _tokens(6)).shape == (2, 16, 64)


def test_remat_and_bfloat16_compute():
  tokens = _tokens(7)
  loss = lambda p, c: jnp.mean(forward(p, c, tokens) ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)  # One compile each, not op by op.
  p = init_params(CFG, jax.random.key(1))
  grads = grad(p, CFG)
  for policy in ("full", "dots"):
    cfg = ModelConfig(**{**CFG.__dict__, "remat": policy})
    remat_grads = grad(p, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 grads, remat_grads)
  bf16 = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  logits = forward(p, bf16, tokens)
  assert logits.dtype == jnp.float32  # Logits are returned in float32 for a stable loss.
  # bfloat16 keeps 8 mantissa bits: logits of O(1) agree with float32 to a few 1e-2.
  np.testing.assert_allclose(logits, forward(p, CFG, tokens), atol=5e-2)


@pytest.mark.parametrize("overrides, match", [
    ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"d_model": 30, "num_heads": 4}, "not divisible"),
    ({"remat": "some"}, "remat"),
    ({"dtype": "float31"}, "not a dtype"),
    ({"num_layers": 0}, "num_layers"),
])
def test_bad_model_config_is_a_clear_error(overrides, match):
  with pytest.raises(UserError, match=match):
    ModelConfig(**{**CFG.__dict__, **overrides})


def test_sequence_longer_than_the_model_takes_is_rejected():
  with pytest.raises(UserError, match="max_seq_len"):
    CFG.check_seq_len(65)
  CFG.check_seq_len(64)
