"""Command line: evaluate a trained run's checkpoint.

    python -m jaxlm.eval --model_dir=/tmp/run [--step=N] [--gin_file=more_domains.gin]
                         [--gin.NAME=VALUE ...] [--json=PATH]
    python -m jaxlm.eval --model_dir=/tmp/run --lm_eval_tasks=hellaswag,lambada_openai

Held-out loss, perplexity and bits per byte on every domain the run evaluates (the stage's own
sources and EvalConfig.domains; a gin file or binding may add more), printed as a table and
written as JSON (default MODEL_DIR/eval/step_<N>.json). The model is rebuilt from the gin config
saved in the checkpoint's record and only its params are read, never the optimizer state; the
numbers equal the trainer's own evaluation of that checkpoint. With --lm_eval_tasks the
checkpoint is evaluated by lm-evaluation-harness instead (`pip install -e ".[lmeval]"`).
"""

import argparse
import json
import math
import os
import sys

from jaxlm import parallel
from jaxlm.config import cli
from jaxlm.evaluation import held_out
from jaxlm.training import compilation_cache


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m jaxlm.eval",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_dir", required=True, help="the MODEL_DIR of a trained run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--json", default=None, help="where to write the results as JSON")
  parser.add_argument("--lm_eval_tasks", default=None,
                      help="comma-separated lm-evaluation-harness tasks instead of held-out loss")
  parser.add_argument("--lm_eval_include_path", default=None,
                      help="a folder of extra lm-evaluation-harness task YAML files")
  parser.add_argument("--lm_eval_limit", type=int, default=None,
                      help="at most this many examples per task")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="sequences per forward pass (lm-evaluation-harness)")
  cli.add_gin_arguments(parser)
  compilation_cache.add_argument(parser)
  return cli.parse_with_gin_flags(parser, argv)


def held_out_results(run) -> dict[str, float]:
  """The trainer's evaluation of `run` (a SavedRun): the same eval sets and the same step."""
  from jaxlm.data.pipeline import build_eval_sets  # pylint: disable=import-outside-toplevel
  from jaxlm.training.train_step import (  # pylint: disable=import-outside-toplevel
      make_eval_step, state_shardings)
  stage = run.stage
  with run.scope():
    with stage.scope():  # The stage's own DataConfig and sources, as the trainer built them.
      evaluation = build_eval_sets(stage.data, run.evaluation.domains)
    batch_sharding = parallel.batch_sharding(run.mesh, run.rules)
    eval_sets = held_out.place_eval_sets(
        evaluation, run.tokenizer.byte_lengths(),
        lambda batch: parallel.global_batch(parallel.host_rows(batch), batch_sharding),
        stage.data.max_eval_batches)
    eval_step = make_eval_step(stage, state_shardings(stage, run.mesh, run.rules).params,
                               batch_sharding)
    return held_out.evaluate(eval_step, run.params, eval_sets, final=True)


def table(results: dict[str, float]) -> str:
  """The final evaluation's numbers (every eval batch, DataConfig.final_eval_batches)."""
  top = "eval_final" if "eval_final/loss" in results else "eval"
  domains = sorted({k.split("/")[1] for k in results if k.count("/") == 2 and k.startswith(top)})
  rows = [("domain", "loss", "perplexity", "bits/byte")]
  for domain, prefix in [(d, f"{top}/{d}/") for d in domains] + [("all", f"{top}/")]:
    loss = results[prefix + "loss"]
    rows.append((domain, f"{loss:.4f}", f"{math.exp(min(loss, 700)):.3f}",
                 f"{results[prefix + 'bits_per_byte']:.4f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cli.setup_logging()

  def run_eval() -> int:
    compilation_cache.enable(args.compilation_cache)
    from jaxlm.training.saved_run import load_saved_run  # pylint: disable=import-outside-toplevel
    run = load_saved_run(args.model_dir, args.step, args.gin_file, args.gin_bindings,
                         args.gin_search_paths)
    if args.lm_eval_tasks:
      from jaxlm.evaluation import harness  # pylint: disable=import-outside-toplevel
      results = harness.evaluate_tasks(run, args.lm_eval_tasks.split(","),
                                               args.lm_eval_include_path, args.lm_eval_limit,
                                               args.batch_size)
      print(harness.table(results))
      record = {"model_dir": run.model_dir, "step": run.step, "lm_eval": results}
    else:
      results = held_out_results(run)
      results = {**results, **{k.replace("/loss", "/perplexity"): math.exp(min(v, 700))
                               for k, v in results.items() if k.endswith("/loss")}}
      print(f"{run.model_dir} step {run.step} (stage {run.stage.name!r})")
      print(table(results))
      record = {"model_dir": run.model_dir, "step": run.step, "stage": run.stage.name,
                "results": results}
    path = args.json or os.path.join(run.model_dir, "eval", f"step_{run.step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 0

  return cli.run_guarded(run_eval)


if __name__ == "__main__":
  sys.exit(main())
