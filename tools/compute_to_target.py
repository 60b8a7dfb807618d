"""How much compute each run needed to reach a baseline run's final held-out loss.

    python tools/compute_to_target.py --baseline=runs/scratch gstack=runs/gstack \
        ligo=runs/ligo [--metric=eval/loss] [--x=flops] [--paper=gstack:54.6,ligo:44.7]

For each NAME=DIR: the first point where DIR's metric is at or below the baseline's final value
(linearly interpolated in x between the two evaluations around the crossing), the compute spent
until then (total/flops or total/tokens from the run's metrics.jsonl, which counts every stage
with its own model) and the saving 1 - that / the baseline's total. A run that never gets there
says so with its final value. Prints a markdown table; --paper adds the papers' savings (%).
Bad input is one line on stderr, exit 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_runs import PlotError, named_runs, print_report, read_metrics  # noqa: E402  pylint: disable=wrong-import-position


def crossing(xs: list[float], ys: list[float], target: float) -> float | None:
  """The first x where the piecewise-linear curve (xs, ys) reaches `target` or below."""
  for i, (x, y) in enumerate(zip(xs, ys)):
    if y <= target:
      if i == 0:
        return x
      x0, y0 = xs[i - 1], ys[i - 1]
      return x0 + (x - x0) * (y0 - target) / (y0 - y)
  return None


def series(run_dir: str, metric: str, x: str) -> tuple[list[float], list[float]]:
  found = read_metrics(run_dir, x)
  if metric not in found:
    raise PlotError(f"{run_dir}: no {metric} in metrics.jsonl")
  return found[metric]


def savings_table(baseline: str, runs: dict[str, str], metric: str = "eval/loss",
                  x: str = "flops", paper: dict[str, str] | None = None) -> list[str]:
  paper = paper or {}
  base_xs, base_ys = series(baseline, metric, x)
  target, budget = base_ys[-1], base_xs[-1]
  unit = "FLOPs" if x == "flops" else "tokens"
  lines = [f"Target: the baseline's final {metric} = {target:.4f} after {budget:.3g} {unit}.", "",
           f"| arm | {unit} to reach the target | saving | final {metric} | paper's saving |",
           "|---|---|---|---|---|"]
  for name, run_dir in runs.items():
    xs, ys = series(run_dir, metric, x)
    reached = crossing(xs, ys, target)
    if reached is None:
      spent, saving = f"not reached in {xs[-1]:.3g}", "-"
    else:
      spent, saving = f"{reached:.3g}", f"{100 * (1 - reached / budget):.1f}%"
    lines.append(f"| {name} | {spent} | {saving} | {ys[-1]:.4f} | {paper.get(name, '-')} |")
  return lines


def _paper_savings(text: str) -> dict[str, str]:
  """--paper=NAME:PERCENT,... as {name: 'PERCENT%'}."""
  pairs = {}
  for item in filter(None, text.split(",")):
    name, sep, percent = item.partition(":")
    if not sep:
      raise PlotError(f"--paper item {item!r}: expected NAME:PERCENT")
    pairs[name] = f"{percent}%"
  return pairs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="NAME=DIR for each run to measure")
  parser.add_argument("--baseline", required=True, help="the run whose final value is the target")
  parser.add_argument("--metric", default="eval/loss")
  parser.add_argument("--x", default="flops", choices=("flops", "tokens"))
  parser.add_argument("--paper", default="", help="NAME:PERCENT,... the papers' savings")
  args = parser.parse_args(argv)
  return print_report(lambda: savings_table(args.baseline, named_runs(args.runs), args.metric,
                                            args.x, _paper_savings(args.paper)))


if __name__ == "__main__":
  sys.exit(main())
