"""Sampling (jaxlm.evaluation.decoding): the filters on hand-made logits, the KV cache against re-running the
window, left padding, eos per row, and `python -m jaxlm.generate` on a trained run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from jaxlm import generate
from jaxlm.errors import UserError
from jaxlm.evaluation.decoding import (Sampling, filter_logits, generate_tokens, left_pad,
                                       sample_tokens)
from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.model.transformer import decode_step, init_cache, prefill

# init_std 0.2: peaked logits, so greedy choices are not near-ties that float rounding could flip.
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_seq_len=64, init_std=0.2)
PROMPTS = [[1, 5, 9, 12, 3], [1, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


# The filters, on hand-made logits.

def _kept(logits_BV):
  return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(logits_BV)]


def test_top_k_keeps_exactly_k_even_with_ties():
  logits = jnp.array([[0.0, 3.0, 1.0, 3.0, 2.0, -1.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
  assert _kept(filter_logits(logits, top_k=3)) == [{1, 3, 4}, {0, 1, 2}]
  assert _kept(filter_logits(logits, top_k=1)) == [{1}, {0}]
  kept = filter_logits(logits, top_k=3)
  np.testing.assert_array_equal(kept[0, [1, 3, 4]], logits[0, [1, 3, 4]])  # Values untouched.
  assert _kept(filter_logits(logits, top_k=6)) == _kept(logits)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  assert _kept(filter_logits(logits, top_p=0.3)) == [{1}]  # The most likely always stays.
  assert _kept(filter_logits(logits, top_p=0.5)) == [{1}]
  assert _kept(filter_logits(logits, top_p=0.75)) == [{1, 3}]
  assert _kept(filter_logits(logits, top_p=0.9)) == [{1, 3, 2}]
  assert _kept(filter_logits(logits, top_p=0.99)) == [{0, 1, 2, 3}]
  # After top-k, the nucleus is taken over the renormalized survivors: 0.5/0.8, 0.3/0.8.
  assert _kept(filter_logits(logits, top_k=2, top_p=0.6)) == [{1}]
  assert _kept(filter_logits(logits, top_k=2, top_p=0.7)) == [{1, 3}]


def test_temperature_zero_is_argmax_and_samples_stay_in_the_kept_set():
  logits = jnp.array([[0.0, 2.0, 1.0, 1.9], [3.0, -2.0, 0.0, 2.5]])
  np.testing.assert_array_equal(sample_tokens(logits, jax.random.key(0), Sampling()), [1, 0])
  # Temperature 0 ignores the filters' randomness entirely; top-k 1 is greedy at any temperature.
  for seed in range(5):
    np.testing.assert_array_equal(
        sample_tokens(logits, jax.random.key(seed), Sampling(temperature=2.0, top_k=1)), [1, 0])
  draws = jax.vmap(lambda k: sample_tokens(logits, k, Sampling(temperature=1.0, top_k=2)))(
      jax.random.split(jax.random.key(1), 400))
  assert set(np.asarray(draws[:, 0]).tolist()) == {1, 3}
  assert set(np.asarray(draws[:, 1]).tolist()) == {0, 3}


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature")])
def test_bad_sampling_settings_are_clear_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    Sampling(**kwargs)


# The KV cache.

def test_cached_logits_match_the_full_forward_pass(params):
  prompt_BP, pads_B = left_pad(PROMPTS, pad_id=0)
  tokens_BT = jnp.concatenate([jnp.asarray(prompt_BP),
                               jax.random.randint(jax.random.key(3), (3, 6), 3, 64)], axis=1)
  width, total = prompt_BP.shape[1], tokens_BT.shape[1]
  columns = jnp.arange(total)[None]
  positions_BT = jnp.maximum(columns - pads_B[:, None], 0)
  segments_BT = (columns >= pads_B[:, None]).astype(jnp.int32)
  expected_BTV = forward(params, CFG, tokens_BT, positions_BT, segments_BT)

  logits_BV, cache = jax.jit(prefill, static_argnums=1)(
      params, CFG, init_cache(CFG, 3, total), tokens_BT[:, :width], positions_BT[:, :width],
      segments_BT[:, :width])
  np.testing.assert_allclose(logits_BV, expected_BTV[:, width - 1], atol=1e-5, rtol=1e-5)
  step = jax.jit(decode_step, static_argnums=1)
  for t in range(width, total):
    logits_BV, cache = step(params, CFG, cache, tokens_BT[:, t:t + 1], positions_BT[:, t:t + 1])
    np.testing.assert_allclose(logits_BV, expected_BTV[:, t], atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == total


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, top_k=10, top_p=0.9)])
def test_cache_and_no_cache_give_the_same_tokens(params, sampling):
  with_cache = generate_tokens(params, CFG, PROMPTS, 12, jax.random.key(1), sampling)
  without = generate_tokens(params, CFG, PROMPTS, 12, jax.random.key(1), sampling,
                            use_cache=False)
  assert with_cache.tokens == without.tokens
  assert all(len(t) == 12 for t in with_cache.tokens)


def test_padding_is_invisible(params):
  batch = generate_tokens(params, CFG, PROMPTS, 12, jax.random.key(1))
  # Each row of the left-padded batch continues exactly as its prompt alone does.
  for prompt, tokens in zip(PROMPTS, batch.tokens):
    assert generate_tokens(params, CFG, [prompt], 12, jax.random.key(1)).tokens == [tokens]


def test_eos_stops_each_row_on_its_own(params):
  sampling = Sampling(temperature=1.0)
  free = generate_tokens(params, CFG, PROMPTS, 12, jax.random.key(2), sampling).tokens
  # A token the middle row first samples after its first step becomes eos: every row stops at
  # its first occurrence of it (same key, so the same draws until then), the others run on.
  eos = next(t for i, t in enumerate(free[1]) if i > 0 and t not in free[1][:i])
  stopped = generate_tokens(params, CFG, PROMPTS, 12, jax.random.key(2), sampling, eos_id=eos)
  for full, tokens, hit in zip(free, stopped.tokens, stopped.stopped_on_eos):
    assert (tokens, hit) == ((full[:full.index(eos)], True) if eos in full else (full, False))
  assert stopped.stopped_on_eos[1] and 0 < len(stopped.tokens[1]) < 12


def test_prompt_plus_new_tokens_longer_than_the_model_is_a_clear_error(params):
  long_prompt = list(range(3, 60))
  with pytest.raises(UserError, match=r"prompt 2 is 57 tokens.*max_seq_len=64; lower "
                                      r"max_new_tokens to at most 7"):
    generate_tokens(params, CFG, [[1, 2], long_prompt], 8, jax.random.key(0))
  with pytest.raises(UserError, match="no prompt"):
    generate_tokens(params, CFG, [], 8, jax.random.key(0))


# The command line, on the shared quickstart run (conftest.quick_trained_run).

@pytest.fixture
def trained_run(quick_trained_run):
  return quick_trained_run[0]


def test_cli_batch_of_prompts_greedy_with_json(trained_run, tmp_path, capsys):
  out = tmp_path / "out.json"
  args = [f"--model_dir={trained_run}", "--prompt=def ", "--prompt=import os\n",
          "--max_new_tokens=8", "--temperature=0", f"--json={out}"]
  assert generate.main(args) == 0
  printed = capsys.readouterr().out
  record = json.loads(out.read_text())
  assert record["step"] == 6 and record["sampling"]["temperature"] == 0
  results = record["results"]
  assert [r["prompt"] for r in results] == ["def ", "import os\n"]
  for r in results:
    assert len(r["token_ids"]) == 8 or r["stopped_on_eos"]
    assert r["prompt"] + r["completion"] in printed
  # The reference path prints the same completions.
  assert generate.main([*args[:-1], "--no_cache"]) == 0
  assert capsys.readouterr().out == printed


@pytest.mark.parametrize("extra, expected", [
    ([], "no prompt given; pass --prompt=TEXT"),
    (["--prompt=x", "--prompt=long", "--max_new_tokens=1021"],
     "prompt 2 is 5 tokens and max_new_tokens=1021 would need 1026 positions, more than the "
     "model's max_seq_len=1024; lower max_new_tokens to at most 1019"),
    (["--prompt=x", "--top_p=0"], "top_p=0.0; it must be in (0, 1]"),
    (["--prompt=x", "--top_k=1000"], "top_k=1000 exceeds the vocabulary (384)"),
    (["--prompt=x", "--step=7"], "no checkpoint at step 7"),
])
def test_cli_bad_input_is_one_line_and_exit_2(trained_run, capsys, extra, expected):
  assert generate.main([f"--model_dir={trained_run}", *extra]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jaxlm: error: ")
  assert expected in err


def test_cli_without_a_checkpoint_in_a_subprocess(tmp_path):
  result = subprocess.run([sys.executable, "-m", "jaxlm.generate", f"--model_dir={tmp_path}",
                           "--prompt=hi"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"jaxlm: error: {str(tmp_path)!r} has no checkpoints/ folder; give the MODEL_DIR of a run "
      "that has saved a checkpoint"]
