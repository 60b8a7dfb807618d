"""lm-evaluation-harness (EleutherAI, `pip install -e ".[lmeval]"`) over a jaxlm checkpoint:
`JaxlmLM` implements the harness's LM interface, so any of its tasks (or a task YAML of your
own, `--lm_eval_include_path`) scores a trained run:

    python -m jaxlm.eval --model_dir=/tmp/run --lm_eval_tasks=lambada_openai --lm_eval_limit=100

Scoring follows the harness's Hugging Face model: a continuation's tokens are those of
context + continuation after the context's, and inputs longer than the model's window keep their
last max_seq_len tokens. Sequences are padded to a few fixed lengths so that only a handful of
shapes ever compile.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxlm.evaluation import decoding
from jaxlm.errors import UserError
from jaxlm.model import forward

log = logging.getLogger("jaxlm")


def _padded_length(n: int, limit: int) -> int:
  """The smallest power of two (at least 16) >= n, capped at the model's window."""
  return min(limit, max(16, 1 << (n - 1).bit_length()))


class JaxlmLM(LM):
  """A SavedRun (jaxlm/training/saved_run.py) as a harness LM."""

  def __init__(self, run, batch_size: int = 8):
    super().__init__()
    self.run, self.batch_size = run, batch_size
    self.tokenizer, self.config = run.tokenizer, run.stage.model
    self.max_length = self.config.max_seq_len
    config = self.config

    @jax.jit
    def score(params, inputs_BL, targets_BL):
      """Per-position log p(target) and whether the target is the argmax."""
      logp_BLV = jax.nn.log_softmax(forward(params, config, inputs_BL), axis=-1)
      logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
      return logp_BL, jnp.argmax(logp_BLV, axis=-1) == targets_BL

    self._score = score

  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text))

  def _score_pairs(self, pairs) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) -> (sum of the continuation's log-probs, all greedy)."""
    results = []
    for start in range(0, len(pairs), self.batch_size):
      chunk = pairs[start:start + self.batch_size]
      sequences = [(context + continuation)[-(self.max_length + 1):]
                   for context, continuation in chunk]
      length = _padded_length(max(len(s) - 1 for s in sequences), self.max_length)
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for row, sequence in enumerate(sequences):
        inputs[row, :len(sequence) - 1] = sequence[:-1]
        targets[row, :len(sequence) - 1] = sequence[1:]
      with self.run.scope():
        logp, greedy = jax.device_get(self._score(self.run.params, inputs, targets))
      for row, (sequence, (_, continuation)) in enumerate(zip(sequences, chunk)):
        end = len(sequence) - 1
        span = slice(end - len(continuation), end)
        results.append((float(np.sum(logp[row, span], dtype=np.float64)),
                        bool(np.all(greedy[row, span]))))
    return results

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for request in requests:
      context, continuation = request.args
      whole = self._encode(context + continuation)
      context_ids = [self.tokenizer.bos_id] + self._encode(context)
      pairs.append((context_ids, whole[len(context_ids) - 1:]))
    return self._score_pairs(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    totals = []
    for request in requests:
      (text,) = request.args
      windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
          self._encode(text), self.tokenizer.bos_id, self.max_length, 1)]
      totals.append(sum(logp for logp, _ in self._score_pairs(windows)))
    return totals

  def generate_until(self, requests) -> list[str]:
    """Greedy (or sampled, with do_sample and a temperature) continuation of each context, cut
    at the first stop string; the context keeps its last tokens when it and max_gen_toks do
    not fit the window."""
    outputs = []
    for index, request in enumerate(requests):
      context, gen_kwargs = request.args
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - 1)
      prompt = ([self.tokenizer.bos_id] + self._encode(context))[-(self.max_length - max_new):]
      temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
      with self.run.scope():
        ids = decoding.generate_tokens(
            self.run.params, self.config, [prompt], max_new, jax.random.key(index),
            decoding.Sampling(temperature=temperature), eos_id=self.tokenizer.eos_id,
            pad_id=getattr(self.tokenizer, "pad_id", 0)).tokens[0]
      text = self.tokenizer.decode(ids)
      for stop in until:
        text = text.split(stop)[0]
      outputs.append(text)
    return outputs


def evaluate_tasks(run, tasks: list[str], include_path: str | None = None,
                   limit: int | None = None, batch_size: int = 8) -> dict:
  """{task: {metric: value}} from the harness."""
  manager = None
  if include_path:  # Indexing only your folder is much faster than the harness's ~10k tasks.
    manager = TaskManager(include_path=include_path, include_defaults=False)
  if manager is None or any(t not in manager.all_tasks for t in tasks):
    manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise UserError(f"unknown lm-evaluation-harness task(s) {unknown}; see `lm_eval --tasks "
                    "list`, or give a folder of task YAML files with --lm_eval_include_path")
  out = simple_evaluate(model=JaxlmLM(run, batch_size), tasks=tasks, task_manager=manager,
                        limit=limit, log_samples=False, bootstrap_iters=0)
  return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
          for task, metrics in out["results"].items()}


def table(results: dict) -> str:
  lines = []
  for task, metrics in results.items():
    for name, value in sorted(metrics.items()):
      lines.append(f"{task:24s} {name:28s} {value:.4f}")
  return "\n".join(lines)
