"""Vocabulary expansion for language or domain adaptation: extend a tokenizer with pieces learned
on the new domain (existing ids never change), then grow the embedding and output matrices in a
stage transition, initialising the new rows from the old model:

  "mean"  the mean of the old-tokenizer pieces of the new token's text (IndoBERTweet,
          arXiv:2109.04607; Bilingual Adaptation, arXiv:2407.12869)
  "mvn"   a draw from the multivariate normal fitted to the old rows (CW2V-style,
          Hewitt's "initializing new word embeddings", 2021)
  "focus" a similarity-weighted combination of old tokens whose text overlaps the new token's
          (FOCUS-like, arXiv:2305.14481; FOCUS weighs by auxiliary fastText similarity, which
          we replace by character-trigram overlap of the token strings: no extra model)
  "random" the new stage's own initialisation (the baseline)

Old tokens keep their rows, so before any training their logits are unchanged: new rows only add
candidates to the softmax. With `keep_optimizer_state` the Adam moments of the new rows start at
zero. Stage B's ModelConfig.vocab_size must hold the extended tokenizer; rows beyond the
tokenizer (padding) start at zero.

    continual/Stage.transition = [@expand_vocabulary]
    continual/DataConfig.tokenizer = @continual/huggingface_tokenizer()   # the extended one
    expand_vocabulary.init = "mean"
"""

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.anatomy import anatomy
from jaxlm.model.transformer import init_params
from jaxlm.methods.transition import TransitionContext, transition
from jaxlm.optim.state_layout import map_same_leaves
from jaxlm.tree_names import replace_named

INITS = ("mean", "mvn", "focus", "random")
FOCUS_TOP_K = 8
FOCUS_TEMPERATURE = 0.1


def token_texts(tokenizer, ids) -> list[str]:
  """The text each id decodes to on its own."""
  return [tokenizer.decode(np.asarray([i])) for i in ids]


def _token_strings(old, new, ids) -> tuple[list[str], list[str]]:
  """Each id's own string in both tokenizers (a byte-level piece stays distinct even when it
  decodes to no valid UTF-8), or, when one has none (jaxlm's bytes), the decoded text."""
  if hasattr(old, "id_to_token") and hasattr(new, "id_to_token"):
    return ([old.id_to_token(int(i)) for i in ids], [new.id_to_token(int(i)) for i in ids])
  return token_texts(old, ids), token_texts(new, ids)


def check_extension(old, new) -> None:
  """`new` keeps every id of `old` for the same token (it may only add ids after them)."""
  if new.vocab_size < old.vocab_size:
    raise UserError(f"the extended tokenizer has {new.vocab_size} ids, fewer than the "
                    f"{old.vocab_size} of the one it extends: it removes tokens")
  old_texts, new_texts = _token_strings(old, new, range(old.vocab_size))
  for i, (a, b) in enumerate(zip(old_texts, new_texts)):
    if a != b:
      raise UserError(f"the extended tokenizer renumbers id {i} ({a!r} becomes {b!r}); an "
                      "extension may only append new ids after the existing ones")


def _mean_pieces(old, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, K], weights [N, K]): each new token as the mean of its old-tokenizer pieces."""
  pieces = [old.encode(t) if t else np.zeros((0,), np.int32) for t in texts]
  width = max([len(p) for p in pieces] + [1])
  ids, weights = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), np.float32)
  for row, p in enumerate(pieces):
    ids[row, :len(p)] = p
    weights[row, :len(p)] = 1.0 / max(len(p), 1)
  return ids, weights


def _trigrams(text: str) -> set[str]:
  padded = f" {text} "
  return {padded[i:i + 3] for i in range(max(len(padded) - 2, 1))}


def _focus_weights(old, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, K], weights [N, K]): the FOCUS_TOP_K old tokens most similar to each new token by
  character-trigram Jaccard similarity, softmax-weighted; the mean of its pieces when none
  overlaps."""
  old_texts = token_texts(old, range(old.vocab_size))
  old_grams = [_trigrams(t) if t.strip() else set() for t in old_texts]
  index: dict[str, list[int]] = {}
  for i, grams in enumerate(old_grams):
    for g in grams:
      index.setdefault(g, []).append(i)
  fallback_ids, fallback_weights = _mean_pieces(old, texts)
  width = max(FOCUS_TOP_K, fallback_ids.shape[1])
  ids, weights = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), np.float32)
  for row, text in enumerate(texts):
    grams = _trigrams(text)
    candidates = {i for g in grams for i in index.get(g, ())}
    scored = sorted(((len(grams & old_grams[i]) / len(grams | old_grams[i]), i)
                     for i in candidates), reverse=True)[:FOCUS_TOP_K]
    if not scored:
      k = fallback_ids.shape[1]
      ids[row, :k], weights[row, :k] = fallback_ids[row], fallback_weights[row]
      continue
    similarity = np.array([s for s, _ in scored])
    soft = np.exp((similarity - similarity.max()) / FOCUS_TEMPERATURE)
    ids[row, :len(scored)] = [i for _, i in scored]
    weights[row, :len(scored)] = soft / soft.sum()
  return ids, weights


def new_rows(matrix, init: str, old, texts: list[str], rng):
  """Rows for the new tokens from `matrix` [V_old_model, D] (rows are tokens)."""
  old_rows = matrix[:old.vocab_size].astype(jnp.float32)
  if init == "mvn":
    mean = jnp.mean(old_rows, axis=0)
    centred = old_rows - mean
    cov = centred.T @ centred / max(old_rows.shape[0] - 1, 1)
    # A small ridge keeps the Cholesky factor defined when rows < D or rows are collinear.
    chol = jnp.linalg.cholesky(cov + 1e-6 * jnp.trace(cov) / cov.shape[0] * jnp.eye(cov.shape[0]))
    z = jax.random.normal(rng, (len(texts), cov.shape[0]), jnp.float32)
    return mean + z @ chol.T
  ids, weights = (_mean_pieces if init == "mean" else _focus_weights)(old, texts)
  return jnp.einsum("nk,nkd->nd", jnp.asarray(weights), old_rows[jnp.asarray(ids)])


def _grow(matrix, rows_first: bool, size: int, new_ids, fill):
  """`matrix` with its token axis grown to `size` (zeros), then rows `new_ids` set to `fill`."""
  if not rows_first:
    return _grow(matrix.T, True, size, new_ids, fill).T
  grown = jnp.zeros((size, matrix.shape[1]), matrix.dtype).at[:matrix.shape[0]].set(
      matrix[:size])
  if fill is not None:
    grown = grown.at[jnp.asarray(new_ids)].set(fill.astype(matrix.dtype))
  return grown


@gin.configurable
@transition()
def expand_vocabulary(state, ctx: TransitionContext, init: str = "mean"):
  """The previous stage's state with embedding rows (and lm_head columns, and their optimizer
  moments) for the next stage's extended tokenizer; see the module docstring."""
  if init not in INITS:
    raise UserError(f"expand_vocabulary.init={init!r}; choose one of {list(INITS)}")
  old, new = ctx.previous_tokenizer, ctx.following_tokenizer
  check_extension(old, new)
  size = ctx.following.model.vocab_size
  if size < new.vocab_size:
    raise UserError(f"stage {ctx.following.name!r}: ModelConfig.vocab_size={size} cannot hold "
                    f"the extended tokenizer's {new.vocab_size} ids; raise it")
  new_ids = np.arange(old.vocab_size, new.vocab_size)
  texts = token_texts(new, new_ids)
  # The params with a token axis (the embedding, an untied head), as the anatomy lists them.
  token_parts = [p for p in anatomy(ctx.previous.model) if "vocab" in p.axes]
  # Two keys at least: the embedding draws with the first of two whether or not a head follows.
  rngs = jax.random.split(ctx.rng, max(2, len(token_parts)))
  fresh = _fresh_params(ctx) if init == "random" else None
  grown = {}
  for part, rng in zip(token_parts, rngs):
    rows_first = part.axes.index("vocab") == 0
    leaf = part.get(state.params)
    if init != "random":  # A head's output vectors are its columns.
      fill = new_rows(leaf if rows_first else leaf.T, init, old, texts, rng)
    else:  # The next stage's own initialisation of those rows.
      fill = (part.get(fresh) if rows_first else part.get(fresh).T)[new_ids]
    grown[part.name] = _grow(leaf, rows_first, size, new_ids, fill)
  params = replace_named(state.params, grown)

  if not ctx.following.keep_optimizer_state:  # The stage starts a fresh one.
    return state.replace(params=params)
  by_name = {part.name: part for part in token_parts}

  def grow_moment(param, leaf):  # Moments of those params: zeros for the new rows.
    return _grow(leaf, by_name[param].axes.index("vocab") == 0, size, new_ids, None)
  return state.replace(params=params, opt_state=map_same_leaves(
      state.opt_state, state.params, grow_moment, "expand_vocabulary",
      ctx.previous.make_optimizer(), only=set(by_name)))


def _fresh_params(ctx: TransitionContext):
  return init_params(ctx.following.model, ctx.rng)


def byte_tokenizer_json() -> str:
  """A tokenizer.json that encodes exactly as jaxlm's ByteTokenizer (<pad> <s> </s>, then byte
  b as id b + 3) and that extend_tokenizer_json can grow: a byte-level BPE with no merges."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from jaxlm.data.tokenizers import ByteTokenizer, _gpt2_unicode_to_byte  # pylint: disable=import-outside-toplevel
  specials = ["<pad>", "<s>", "</s>"]
  vocab = {token: i for i, token in enumerate(specials)}
  vocab.update({char: byte + ByteTokenizer.num_special
                for char, byte in _gpt2_unicode_to_byte().items()})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=True)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(specials)
  return tok.to_str()


def extend_tokenizer_json(tokenizer_json: str, texts, num_new: int) -> str:
  """A byte-level BPE tokenizer.json extended by up to `num_new` tokens learned on `texts`:
  a BPE of the same pre-tokenizer trained on them, whose tokens the old vocabulary lacks are
  appended (ids after the old ones) with the merges that build them, after the old merges."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  old = json.loads(tokenizer_json)
  model = old.get("model", {})
  if model.get("type") != "BPE":
    raise UserError(f"only BPE tokenizer.json files can be extended, not {model.get('type')!r}")
  vocab = dict(model["vocab"])
  learner = tokenizers.Tokenizer.from_str(tokenizer_json)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=len(vocab) + num_new, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  fresh = tokenizers.Tokenizer(tokenizers.models.BPE())
  fresh.pre_tokenizer, fresh.normalizer = learner.pre_tokenizer, learner.normalizer
  fresh.train_from_iterator(texts, trainer)
  learned = json.loads(fresh.to_str())["model"]
  as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)  # Older files.
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  known = set(merges)
  next_id = max(list(vocab.values()) + [t["id"] for t in old.get("added_tokens", [])]) + 1
  added = 0
  for merge in learned["merges"]:
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    token = a + b
    if added >= num_new or token in vocab or a not in vocab or b not in vocab:
      continue
    vocab[token] = next_id
    next_id += 1
    added += 1
    if (a, b) not in known:
      merges.append((a, b))
  model["vocab"] = vocab
  model["merges"] = [" ".join(m) if as_strings else list(m) for m in merges]
  return json.dumps(old, ensure_ascii=False)


def extend_sentencepiece(model_proto: bytes, text_file: str, num_new: int) -> bytes:
  """A SentencePiece model (serialized) extended by up to `num_new` pieces learned on a text
  file with the same settings (tokenizer_training.train_sentencepiece): pieces it lacks are
  appended after the old ones, scored below every old piece in the order they were learned (a
  BPE model merges them last; a unigram model keeps the learned log-probabilities)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  from jaxlm.data.tokenizer_training import train_sentencepiece  # pylint: disable=import-outside-toplevel
  old = sentencepiece_model_pb2.ModelProto()
  old.ParseFromString(model_proto)
  kind = {1: "unigram", 2: "bpe"}.get(old.trainer_spec.model_type)
  if kind is None:
    raise UserError("only BPE and unigram SentencePiece models can be extended")
  known = {p.piece for p in old.pieces}
  with tempfile.TemporaryDirectory() as tmp:
    # 4 specials + 256 byte pieces, then twice the pieces wanted: some are old ones.
    path = train_sentencepiece(text_file, f"{tmp}/new.model", 260 + 2 * num_new,
                               model_type=kind)
    learned = sentencepiece_model_pb2.ModelProto()
    learned.ParseFromString(path.read_bytes())
  normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
  floor = min(p.score for p in old.pieces if p.type == normal)
  added = 0
  for piece in learned.pieces:
    if added >= num_new:
      break
    if piece.type != normal or piece.piece in known:
      continue
    new = old.pieces.add()
    new.piece, new.type = piece.piece, normal
    new.score = piece.score if kind == "unigram" else floor - 1.0 - added
    added += 1
  old.trainer_spec.vocab_size = len(old.pieces)
  return old.SerializeToString()
