"""`python -m jaxlm.eval`: a checkpoint's held-out loss from the gin config saved with it, equal
to the trainer's own evaluation; extra domains from a gin binding; bad input in one line."""

import json
import math

import pytest

from jaxlm import eval as eval_cli
from jaxlm.data import pipeline


@pytest.fixture
def finished(quick_trained_run):
  return quick_trained_run


def _trainer_eval(model_dir, step):
  with open(model_dir / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r["step"] == step and "eval/loss" in r][-1]


@pytest.mark.parametrize("step", [None, 3])
def test_eval_equals_the_trainer_eval_of_the_same_checkpoint(finished, tmp_path, capsys, step,
                                                            monkeypatch):
  model_dir, _ = finished

  def no_train_rows(*args, **kwargs):
    raise AssertionError("jaxlm.eval built training batches; it needs the eval sets only")
  monkeypatch.setattr(pipeline, "TrainBatches", no_train_rows)
  args = [f"--model_dir={model_dir}", f"--json={tmp_path / 'out.json'}"]
  assert eval_cli.main(args + ([f"--step={step}"] if step else [])) == 0
  out = json.loads((tmp_path / "out.json").read_text())
  assert out["step"] == (step or 6)
  expected = _trainer_eval(model_dir, out["step"])
  for key in ("eval/loss", "eval/bits_per_byte", "eval/text/loss", "eval/text/bits_per_byte"):
    # The same jitted eval step on the same batches: equal up to float32 rounding.
    assert out["results"][key] == pytest.approx(expected[key], rel=1e-6), key
  assert out["results"]["eval/text/perplexity"] == pytest.approx(
      math.exp(expected["eval/text/loss"]), rel=1e-6)
  printed = capsys.readouterr().out
  assert "perplexity" in printed and "text" in printed


def test_a_gin_binding_adds_an_eval_domain(finished, tmp_path):
  model_dir, corpus = finished
  other = tmp_path / "other.txt"
  other.write_text(open(json.__file__, encoding="utf-8").read(), encoding="utf-8")
  assert eval_cli.main([f"--model_dir={model_dir}", f"--json={tmp_path / 'out.json'}",
                        "--gin.EvalConfig.domains=[@extra/text_files()]",
                        f"--gin.extra/text_files.paths='{other}'",
                        "--gin.extra/text_files.name='json'"]) == 0
  results = json.loads((tmp_path / "out.json").read_text())["results"]
  assert {"eval/text/loss", "eval/json/loss"} <= set(results)
  del corpus


@pytest.mark.parametrize("make_args, expected", [
    (lambda d, t: [f"--model_dir={t / 'nothing'}"], "has no checkpoints/ folder"),
    (lambda d, t: [f"--model_dir={d}", "--step=5"], "no checkpoint at step 5"),
])
def test_bad_input_is_one_line(finished, tmp_path, capsys, make_args, expected):
  model_dir, _ = finished
  assert eval_cli.main(make_args(model_dir, tmp_path)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0], err
