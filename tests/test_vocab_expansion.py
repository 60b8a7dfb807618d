"""Vocabulary expansion: a tokenizer.json extended on new text keeps every old id; the
expand_vocabulary transition leaves old tokens' logits unchanged before training, for every
initialiser; the new rows are what each initialiser says; bad extensions are one line."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers")

# pylint: disable=wrong-import-position
from hf_fixtures import train_bpe_tokenizer
from jaxlm.training import preflight
from conftest import load_tool
from jaxlm.methods.continual.vocab_expansion import (byte_tokenizer_json, check_extension,
                                             expand_vocabulary, extend_tokenizer_json,
                                             token_texts)
from jaxlm.data.tokenizer_training import train_sentencepiece
from jaxlm.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig
from jaxlm.model.transformer import forward
from jaxlm.optim.optimizers import adamw, train_only
from jaxlm.training.stages import Stage, transition_context
from jaxlm.training.train_step import init_state

FRENCH = ("La maison est grande et belle. Les enfants jouent dans le jardin pendant que leur "
          "mère prépare le dîner. Nous avons mangé une excellente soupe à l'oignon. ") * 40


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("vocab")
  english = root / "english.txt"
  english.write_text(pathlib.Path(json.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  train_bpe_tokenizer(root / "old.json", english, vocab_size=400)
  extended = extend_tokenizer_json((root / "old.json").read_text(encoding="utf-8"), [FRENCH], 60)
  (root / "new.json").write_text(extended, encoding="utf-8")
  return HuggingFaceTokenizer(root / "old.json"), HuggingFaceTokenizer(root / "new.json"), root


def test_extension_appends_new_pieces_and_keeps_every_old_id(tokenizers):
  old, new, _ = tokenizers
  assert new.vocab_size == old.vocab_size + 60
  check_extension(old, new)
  assert len(new.encode(FRENCH)) < 0.8 * len(old.encode(FRENCH))
  assert new.decode(new.encode(FRENCH)) == FRENCH
  texts = token_texts(new, range(old.vocab_size, new.vocab_size))
  assert any(t.strip() in FRENCH and len(t.strip()) >= 4 for t in texts)


def test_renumbering_or_removing_tokens_is_refused(tokenizers):
  old, _, root = tokenizers
  data = json.loads((root / "old.json").read_text(encoding="utf-8"))
  vocab = data["model"]["vocab"]
  a, b = [t for t, i in vocab.items() if i in (300, 301)]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (root / "swapped.json").write_text(json.dumps(data), encoding="utf-8")
  with pytest.raises(UserError, match="renumbers id 300"):
    check_extension(old, HuggingFaceTokenizer(root / "swapped.json"))
  with pytest.raises(UserError, match="removes tokens"):
    check_extension(HuggingFaceTokenizer(root / "new.json"), old)


def _stages(tokenizers, tie):
  old, new, root = tokenizers
  model = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64, max_seq_len=64,
               tie_embeddings=tie)
  first = Stage(num_steps=2, model=ModelConfig(vocab_size=448, **model), name="english")
  second = Stage(num_steps=2, model=ModelConfig(vocab_size=512, **model), name="french",
                 transition=expand_vocabulary)
  object.__setattr__(first, "data", first.data.__class__(tokenizer=old))
  object.__setattr__(second, "data", second.data.__class__(tokenizer=new))
  return first, second


@pytest.mark.parametrize("init,tie", [("mean", False), ("mvn", True), ("focus", False),
                                      ("random", False)])
def test_old_token_logits_are_unchanged_before_training(tokenizers, init, tie):
  old, new, _ = tokenizers
  first, second = _stages(tokenizers, tie)
  state = init_state(first, jax.random.key(0))
  ctx = transition_context(first, second, jax.random.key(1))
  grown = jax.jit(lambda s: expand_vocabulary(s, ctx, init=init))(state)
  assert grown.params["embed"]["embedding"].shape == (512, 32)
  tokens = jnp.asarray(old.encode("def encode(self, o):\n    return o")[None, :32])
  before = forward(state.params, first.model, tokens)
  after = forward(grown.params, second.model, tokens)
  # Old rows are copied, so the logits of old tokens are the same numbers; XLA may tile the
  # wider output matmul differently, hence a float32-rounding tolerance.
  np.testing.assert_array_equal(after[..., :old.vocab_size], before[..., :old.vocab_size])
  new_rows = np.asarray(grown.params["embed"]["embedding"][old.vocab_size:new.vocab_size])
  assert np.all(np.isfinite(new_rows)) and np.all(np.linalg.norm(new_rows, axis=1) > 0)
  assert not np.any(np.asarray(grown.params["embed"]["embedding"][new.vocab_size:]))  # Padding.
  if init == "mean":  # Each new row is the mean of its old-tokenizer pieces' rows.
    token = old.vocab_size + 7
    pieces = old.encode(new.decode(np.asarray([token])))
    np.testing.assert_allclose(new_rows[7], np.mean(np.asarray(
        state.params["embed"]["embedding"])[pieces], axis=0), rtol=1e-5, atol=1e-7)


def test_a_renumbering_extension_fails_the_start_up_checks(tokenizers):
  """The pre-flight hand-over on abstract shapes runs the check, before any training."""
  _, _, root = tokenizers
  first, second = _stages(tokenizers, False)
  data = json.loads((root / "new.json").read_text(encoding="utf-8"))
  vocab = data["model"]["vocab"]
  a, b = [t for t, i in vocab.items() if i in (5, 300)]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (root / "renumbered.json").write_text(json.dumps(data), encoding="utf-8")
  object.__setattr__(second, "data", second.data.__class__(
      tokenizer=HuggingFaceTokenizer(root / "renumbered.json")))
  with pytest.raises(UserError, match="renumbers id 5"):
    preflight.check_transitions([first, second])


def test_a_model_too_small_for_the_extended_tokenizer_is_one_line(tokenizers):
  first, second = _stages(tokenizers, False)
  object.__setattr__(second, "model", ModelConfig(**{**second.model.__dict__, "vocab_size": 448}))
  ctx = transition_context(first, second, jax.random.key(1))
  with pytest.raises(UserError, match="vocab_size=448 cannot hold the extended tokenizer's 460"):
    jax.eval_shape(lambda s: expand_vocabulary(s, ctx), init_state(first, jax.random.key(0)))


def test_train_only_freezes_everything_but_the_embeddings(tokenizers):
  first, _ = _stages(tokenizers, False)
  params = init_state(first, jax.random.key(0)).params
  grads = jax.tree.map(jnp.ones_like, params)
  tx = train_only(1e-2, optimizer=adamw, model=first.model)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in ("embed", "lm_head"):
    assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates[name]))
  for name in ("layer_0", "final_norm"):  # Frozen: exactly no update.
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates[name]))


def test_a_byte_vocabulary_grows_through_the_cli(tmp_path, capsys):
  """--base=bytes starts from a tokenizer.json that encodes exactly as jaxlm's bytes."""
  tool = load_tool("extend_tokenizer")
  (tmp_path / "fr.txt").write_text(FRENCH.replace(". ", ".\n"), encoding="utf-8")
  out = tmp_path / "bytes_fr.json"
  assert tool.main(["--base=bytes", f"--text_file={tmp_path / 'fr.txt'}", "--new_tokens=40",
                    f"--out={out}"]) == 0
  grown, bytes_ = HuggingFaceTokenizer(out), ByteTokenizer()
  assert grown.vocab_size == bytes_.vocab_size + 40
  check_extension(bytes_, grown)
  tricky = "héllo wörld ✓ 日本語 \n\t x = 42\r\n\x00"
  base = HuggingFaceTokenizer(_write(tmp_path / "bytes.json", byte_tokenizer_json()))
  assert base.encode(tricky).tolist() == bytes_.encode(tricky).tolist()
  assert (base.byte_lengths() == bytes_.byte_lengths()).all()
  assert len(grown.encode("Les enfants jouent")) < len(bytes_.encode("Les enfants jouent"))
  assert tool.main(["--base=bytes", f"--text_file={tmp_path / 'none.txt'}", "--new_tokens=4",
                    f"--out={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "none.txt does not exist" in err and len(err.splitlines()) == 1


def test_a_sentencepiece_model_is_extended_keeping_its_ids(tmp_path):
  english = tmp_path / "en.txt"
  english.write_text(pathlib.Path(json.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  (tmp_path / "fr.txt").write_text(FRENCH.replace(". ", ".\n"), encoding="utf-8")
  old_path = train_sentencepiece(str(english), str(tmp_path / "en.model"), 400)
  assert load_tool("extend_tokenizer").main([
      f"--base={old_path}", f"--text_file={tmp_path / 'fr.txt'}", "--new_tokens=30",
      f"--out={tmp_path / 'ext.model'}"]) == 0
  old, new = SentencePieceTokenizer(old_path), SentencePieceTokenizer(tmp_path / "ext.model")
  assert 400 < new.vocab_size <= 430  # Up to 30: what the text yields beyond the old pieces.
  check_extension(old, new)
  text = "Les enfants jouent dans le jardin."
  assert len(new.encode(text)) < len(old.encode(text)) and new.decode(new.encode(text)) == text


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path
