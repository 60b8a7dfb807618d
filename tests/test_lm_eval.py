"""lm-evaluation-harness over a jaxlm checkpoint, offline: tasks defined here (a local JSON-lines
dataset and a task YAML), the harness's own metrics checked against the model computed
directly."""

import json
import math
import re

import jax
import numpy as np
import pytest


pytest.importorskip("lm_eval")

DOCS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " 42"], "label": 0},
    {"context": "import", "choices": [" os", " zz$$"], "label": 0},
    {"context": "for i in", "choices": [" range(10):", " )))"], "label": 0},
    {"context": "The quick brown", "choices": [" fox", " 7%"], "label": 1},
]
TEXTS = ["the cat sat on the mat and the dog ran in the park",
         "def main():\n    print('hello world')\n"]


def _task_yaml(name, data, body):
  return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
          f"    test: {data}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def trained(quick_trained_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  tasks = root / "tasks"
  tasks.mkdir()
  (root / "choice.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS), encoding="utf-8")
  (root / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS),
                                   encoding="utf-8")
  (tasks / "choice.yaml").write_text(_task_yaml(
      "jaxlm_choice", root / "choice.jsonl",
      "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
      "metric_list:\n  - metric: acc\n"), encoding="utf-8")
  (tasks / "text.yaml").write_text(_task_yaml(
      "jaxlm_text", root / "text.jsonl",
      "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
      encoding="utf-8")
  return quick_trained_run[0], tasks


DIRECT_LENGTH = 64  # Every test sequence fits; right padding cannot change a causal model's logits.


def _direct_logprob(run, context: str, continuation: str) -> float:
  """log p(continuation | BOS + context), from the model's logits in float64, one sequence
  right-padded to one length (a single compile)."""
  from jaxlm.model import forward  # pylint: disable=import-outside-toplevel
  tokenizer = run.tokenizer
  context_ids = [tokenizer.bos_id, *tokenizer.encode(context)]
  ids = context_ids + list(tokenizer.encode(continuation))
  assert len(ids) <= DIRECT_LENGTH
  tokens = np.zeros((1, DIRECT_LENGTH), np.int32)
  tokens[0, :len(ids) - 1] = ids[:-1]
  with run.scope():
    logits = np.asarray(jax.jit(forward, static_argnums=1)(run.params, run.stage.model, tokens),
                        np.float64)[0]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
  return float(sum(logp[i - 1, ids[i]] for i in range(len(context_ids), len(ids))))


def test_harness_metrics_equal_a_direct_computation(trained, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  model_dir, tasks = trained
  from jaxlm.evaluation import harness  # pylint: disable=import-outside-toplevel
  from jaxlm.training.saved_run import load_saved_run  # pylint: disable=import-outside-toplevel
  run = load_saved_run(str(model_dir))
  results = harness.evaluate_tasks(run, ["jaxlm_choice", "jaxlm_text"], str(tasks),
                                           batch_size=3)
  chosen = [int(np.argmax([_direct_logprob(run, d["context"], c) for c in d["choices"]]))
            for d in DOCS]
  assert results["jaxlm_choice"]["acc,none"] == pytest.approx(
      np.mean([c == d["label"] for c, d in zip(chosen, DOCS)]))
  # Each text fits the window: the rolling log-likelihood is one pass after BOS.
  logps = [_direct_logprob(run, "", t) for t in TEXTS]
  words = sum(len(re.split(r"\s+", t)) for t in TEXTS)  # As the harness counts words.
  num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
  # float32 logits summed over ~100 tokens: agreement to 1e-4 relative.
  assert results["jaxlm_text"]["word_perplexity,none"] == pytest.approx(
      math.exp(-sum(logps) / words), rel=1e-4)
  assert results["jaxlm_text"]["bits_per_byte,none"] == pytest.approx(
      -sum(logps) / num_bytes / math.log(2), rel=1e-4)


def test_the_eval_command_runs_a_task_and_refuses_an_unknown_one(trained, tmp_path, capsys,
                                                                 monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  model_dir, tasks = trained
  from jaxlm import eval as eval_cli  # pylint: disable=import-outside-toplevel
  args = [f"--model_dir={model_dir}", f"--lm_eval_include_path={tasks}",
          f"--json={tmp_path / 'out.json'}"]
  assert eval_cli.main([*args, "--lm_eval_tasks=jaxlm_choice"]) == 0
  assert "acc,none" in json.loads((tmp_path / "out.json").read_text())["lm_eval"]["jaxlm_choice"]
  capsys.readouterr()
  assert eval_cli.main([*args, "--lm_eval_tasks=no_such_task"]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      "jaxlm: error: unknown lm-evaluation-harness task(s) ['no_such_task']")


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(trained):
  model_dir, _ = trained
  from jaxlm.evaluation import harness  # pylint: disable=import-outside-toplevel
  from jaxlm.evaluation import decoding
  from jaxlm.training.saved_run import load_saved_run  # pylint: disable=import-outside-toplevel
  run = load_saved_run(str(model_dir))
  lm = harness.JaxlmLM(run)

  class Request:  # The harness's Instance: only .args is read.
    def __init__(self, *args):
      self.args = args

  tokenizer = run.tokenizer
  with run.scope():
    ids = decoding.generate_tokens(run.params, run.stage.model,
                                   [[tokenizer.bos_id, *tokenizer.encode("def ")]], 24,
                                   jax.random.key(0), decoding.Sampling(temperature=0.0),
                                   eos_id=tokenizer.eos_id).tokens[0]
  full = tokenizer.decode(ids)
  stop = full[len(full) // 2:len(full) // 2 + 1]  # A character the continuation contains.
  texts = lm.generate_until([Request("def ", {"until": [stop], "max_gen_toks": 24}),
                             Request("def ", {"until": [], "max_gen_toks": 24})])
  assert texts == [full.split(stop)[0], full]
