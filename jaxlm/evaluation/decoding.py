"""Decoding a trained model: greedy, temperature, top-k and top-p sampling of a batch of
prompts with a KV cache (the library behind `python -m jaxlm.generate`, Trainer.sample,
lm-evaluation-harness's generate_until and tools/bench_generate.py):

    result = generate_tokens(params, config, [prompt_ids, ...], max_new_tokens, jax.random.key(0),
                             Sampling(temperature=0.8, top_k=40), eos_id=tokenizer.eos_id)
    result.tokens[i]           # row i's new ids (its eos not included), result.stopped_on_eos[i]

Prompts are left-padded into one [B, P] batch: padding takes segment id 0 (no real token sees
it), each row's positions start at 0 at its first real token, and every row's last prompt token
sits in column P-1, so all rows write the same cache slot each step. The prompt is run through
the model once (`prefill`, with the configured attention implementation), then each new token
costs one position (`decode_step`); the whole loop is one jitted `lax.while_loop` that stops
when every row has produced eos or `max_new_tokens` tokens. `use_cache=False` re-runs the model
on the whole window for each token instead: the reference the cache is tested against.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.config import ModelConfig
from jaxlm.model.transformer import decode_step, forward, init_cache, prefill



@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked from the logits: temperature first, then the top-k and top-p
  filters (the order Hugging Face's generate applies them in), then a draw."""
  temperature: float = 0.0  # 0: greedy (argmax; the filters cannot change it).
  top_k: int = 0  # Keep the k most likely tokens (Fan et al. 2018, 1805.04833); 0: all.
  top_p: float = 1.0  # Nucleus (Holtzman et al. 2019, 1904.09751); 1: all.

  def __post_init__(self):
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not (number(self.temperature) and self.temperature >= 0):
      raise UserError(f"temperature={self.temperature!r}; it must be a number >= 0 (0: greedy)")
    if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
      raise UserError(f"top_k={self.top_k!r}; it must be an integer >= 0 (0: keep every token)")
    if not (number(self.top_p) and 0 < self.top_p <= 1):
      raise UserError(f"top_p={self.top_p!r}; it must be in (0, 1] (1: keep every token)")


def filter_logits(logits_BV, top_k: int = 0, top_p: float = 1.0):
  """The logits with every token outside the kept set at -inf. top-k keeps exactly k tokens (ties
  at the k-th value broken towards the lower id); top-p keeps the smallest set of most likely
  tokens whose probability reaches p: a token stays if the mass ranked above it is below p, so
  the most likely token always stays (Holtzman et al. 2019, 1904.09751, section 3.1)."""
  rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
  if top_k and top_k < logits_BV.shape[-1]:
    _, top_BK = jax.lax.top_k(logits_BV, top_k)
    keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, top_BK].set(True)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  if top_p < 1.0:
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)  # Most likely first.
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # Mass ranked above each token.
    keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, order_BV].set(above_BV < top_p)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return logits_BV


def sample_tokens(logits_BV, key, sampling: Sampling):
  """One token id per row [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int32 with each prompt at the right end, padding per row [B] int32)."""
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, width - len(prompt):] = prompt
  return tokens, np.array([width - len(p) for p in prompts], np.int32)


def _layout(pads_B, length: int):
  """Positions and segment ids of the first `length` columns of left-padded rows."""
  columns = jnp.arange(length)[None, :]
  positions_BL = jnp.maximum(columns - pads_B[:, None], 0)
  return positions_BL, (columns >= pads_B[:, None]).astype(jnp.int32)


def _sample_loop(first_logits_BV, state, advance, rng, max_new_tokens, sampling, eos_id, pad_id):
  """The new tokens [B, N] (pad after a row's eos). `advance(i, tokens_B, state)` feeds token
  i - 1 of every row to the model and returns (logits for token i, state)."""
  never = jnp.zeros(first_logits_BV.shape[:1], bool)

  def pick(i, logits_BV, done_B):
    token_B = sample_tokens(logits_BV, jax.random.fold_in(rng, i), sampling)
    token_B = jnp.where(done_B, pad_id, token_B)
    return token_B, done_B | (token_B == eos_id)

  token_B, done_B = pick(0, first_logits_BV, never)
  out_BN = jnp.full((token_B.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)

  def body(carry):
    i, token_B, state, out_BN, done_B = carry
    logits_BV, state = advance(i, token_B, state)
    token_B, done_B = pick(i, logits_BV, done_B)
    return i + 1, token_B, state, out_BN.at[:, i].set(token_B), done_B

  carry = jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[4]), body,
                             (jnp.int32(1), token_B, state, out_BN, done_B))
  return carry[3]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id", "use_cache"))
def _generate(params, prompt_BP, pads_B, rng, *, config: ModelConfig, max_new_tokens: int,
              sampling: Sampling, eos_id: int, pad_id: int, use_cache: bool):
  batch, width = prompt_BP.shape
  total = width + max_new_tokens
  if use_cache:
    positions_BP, segments_BP = _layout(pads_B, width)
    logits_BV, cache = prefill(params, config, init_cache(config, batch, total), prompt_BP,
                               positions_BP, segments_BP)

    def advance(i, token_B, cache):  # Token i - 1 goes into column width + i - 1.
      positions_B1 = (width + i - 1 - pads_B)[:, None]
      return decode_step(params, config, cache, token_B[:, None], positions_B1,
                         jnp.ones_like(positions_B1))

    return _sample_loop(logits_BV, cache, advance, rng, max_new_tokens, sampling, eos_id, pad_id)

  # The reference: the whole window through `forward` for every token (causal, so the columns
  # not yet written, pad tokens in segment 1, never reach the column read).
  positions_BT, segments_BT = _layout(pads_B, total)
  window_BT = jnp.full((batch, total), pad_id, jnp.int32).at[:, :width].set(prompt_BP)

  def logits_after(window_BT, column):
    logits_BTV = forward(params, config, window_BT, positions_BT, segments_BT)
    return jax.lax.dynamic_index_in_dim(logits_BTV, column, axis=1, keepdims=False)

  def advance(i, token_B, window_BT):
    window_BT = window_BT.at[:, width + i - 1].set(token_B)
    return logits_after(window_BT, width + i - 1), window_BT

  return _sample_loop(logits_after(window_BT, width - 1), window_BT, advance, rng,
                      max_new_tokens, sampling, eos_id, pad_id)


@dataclasses.dataclass
class Generated:
  tokens: list[list[int]]  # Each row's new ids, up to and without its eos.
  stopped_on_eos: list[bool]


def check_lengths(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int):
  """A UserError unless every prompt plus max_new_tokens fits in the model's positions."""
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise UserError(f"max_new_tokens={max_new_tokens!r}; it must be an integer >= 1")
  if not prompts:
    raise UserError("no prompt given; pass at least one")
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise UserError(f"prompt {i + 1} has no tokens; start it with the tokenizer's bos id")
  longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
  length = len(prompts[longest])
  if length + max_new_tokens > config.max_seq_len:
    room = config.max_seq_len - length
    fix = (f"lower max_new_tokens to at most {room} or shorten the prompt" if room >= 1 else
           f"shorten the prompt to at most {config.max_seq_len - 1} tokens")
    raise UserError(
        f"prompt {longest + 1} is {length} tokens and max_new_tokens={max_new_tokens} would "
        f"need {length + max_new_tokens} positions, more than the model's max_seq_len="
        f"{config.max_seq_len}; {fix}")


def generate_tokens(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, rng, sampling: Sampling = Sampling(),
                    eos_id: int | None = None, pad_id: int = 0,
                    use_cache: bool = True) -> Generated:
  """Up to `max_new_tokens` new ids after each prompt (lists of ids, any lengths, one batch); a
  row stops at `eos_id` (None: never). Runs under the caller's mesh and logical-axis rules, if
  any (SavedRun.scope())."""
  check_lengths(config, prompts, max_new_tokens)
  prompt_BP, pads_B = left_pad(prompts, pad_id)
  out_BN = _generate(params, prompt_BP, pads_B, rng, config=config,
                     max_new_tokens=max_new_tokens, sampling=sampling,
                     eos_id=-1 if eos_id is None else int(eos_id), pad_id=int(pad_id),
                     use_cache=use_cache)
  tokens, stopped = [], []
  for row in np.asarray(out_BN).tolist():
    end = row.index(eos_id) if eos_id is not None and eos_id in row else len(row)
    tokens.append(row[:end])
    stopped.append(end < len(row))
  return Generated(tokens, stopped)
