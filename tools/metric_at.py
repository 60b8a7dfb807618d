"""A markdown table of metrics at given steps of several runs (e.g. before and after a stage
boundary), read from each run's metrics.jsonl.

    python tools/metric_at.py --at=400:eval/wiki/loss --at=600:eval/stories/loss \
        dense=runs/spdf_dense sparse=runs/spdf_50

Each --at=STEP:METRIC is one column: the value logged at STEP (the last record of that step;
"-" where the run did not log it). Bad input is one line on stderr, exit 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_runs import PlotError, named_runs, print_report, read_metrics  # noqa: E402  pylint: disable=wrong-import-position


def value_at(series: dict, metric: str, step: int) -> float | None:
  steps, values = series.get(metric, ([], []))
  found = [v for s, v in zip(steps, values) if int(s) == step]
  return found[-1] if found else None


def table(runs: dict[str, str], columns: list[tuple[int, str]]) -> list[str]:
  lines = ["| run | " + " | ".join(f"{m} at step {s}" for s, m in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for name, run_dir in runs.items():
    series = read_metrics(run_dir, "step")
    cells = [value_at(series, m, s) for s, m in columns]
    lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells)
                 + " |")
  return lines


def _column(text: str) -> tuple[int, str]:
  step, sep, metric = text.partition(":")
  if not sep or not step.isdigit() or not metric:
    raise PlotError(f"--at={text!r}: expected STEP:METRIC, e.g. 400:eval/loss")
  return int(step), metric


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="NAME=DIR for each run")
  parser.add_argument("--at", action="append", required=True, help="STEP:METRIC (repeatable)")
  args = parser.parse_args(argv)
  return print_report(lambda: table(named_runs(args.runs), [_column(c) for c in args.at]))


if __name__ == "__main__":
  sys.exit(main())
