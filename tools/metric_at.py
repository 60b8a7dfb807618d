"""A markdown table of metrics at given steps of several runs (e.g. before and after a stage
boundary), read from each run's metrics.jsonl.

    python tools/metric_at.py --at=400:eval/wiki/loss --at=600:eval/stories/loss \
        dense=runs/spdf_dense sparse=runs/spdf_50_s0,runs/spdf_50_s1

Each run is NAME=DIR[,DIR...] (several DIRs: seeds of one arm). Each --at=STEP:METRIC is one
column: the value logged at STEP (the last record of that step; "-" where the run did not log
it); for an arm of several seeds, mean ± sample standard deviation over the seeds that logged it,
with n. Bad input is one line on stderr, exit 2.
"""

import argparse
import sys

import numpy as np

from jaxlm.reports.runs import ReportError, named_runs, print_report, read_metrics


def value_at(series: dict, metric: str, step: int) -> float | None:
  steps, values = series.get(metric, ([], []))
  found = [v for s, v in zip(steps, values) if int(s) == step]
  return found[-1] if found else None


def cell(values: list[float], seeds: int) -> str:
  """One arm's values at a step: the value (one seed), or mean ± s.d. (n) over seeds."""
  if not values:
    return "-"
  if seeds == 1:
    return f"{values[0]:.4f}"
  spread = f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
  return f"{np.mean(values):.4f}{spread} (n={len(values)})"


def table(runs: dict[str, list[str]], columns: list[tuple[int, str]]) -> list[str]:
  lines = ["| run | " + " | ".join(f"{m} at step {s}" for s, m in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for name, run_dirs in runs.items():
    seeds = [read_metrics(d, "step") for d in run_dirs]
    cells = [cell([v for v in (value_at(x, m, s) for x in seeds) if v is not None], len(seeds))
             for s, m in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def _column(text: str) -> tuple[int, str]:
  step, sep, metric = text.partition(":")
  if not sep or not step.isdigit() or not metric:
    raise ReportError(f"--at={text!r}: expected STEP:METRIC, e.g. 400:eval/loss")
  return int(step), metric


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="NAME=DIR[,DIR...] for each run (DIRs: seeds)")
  parser.add_argument("--at", action="append", required=True, help="STEP:METRIC (repeatable)")
  args = parser.parse_args(argv)
  return print_report(lambda: table(named_runs(args.runs), [_column(c) for c in args.at]))


if __name__ == "__main__":
  sys.exit(main())
