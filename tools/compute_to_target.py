"""How much compute each run needed to reach a baseline run's final held-out loss.

    python tools/compute_to_target.py --baseline=runs/scratch_s0,runs/scratch_s1 \
        gstack=runs/gstack_s0,runs/gstack_s1 ligo=runs/ligo [--metric=eval/loss] [--x=flops] \
        [--smooth=5] [--paper=gstack:54.6,ligo:44.7] [--plot=plots/to_target.png] \
        [--baseline_label=scratch] [--y_label="held-out loss (nats/byte)"]

A run argument is NAME=DIR[,DIR...] and --baseline is DIR[,DIR...]: several MODEL_DIRs are seeds.
Each curve (the metric against total/flops or total/tokens, which count every stage with its own
model) is smoothed first: every evaluation is replaced by the value, at its x, of a least-squares
line through the K evaluations around it (K = --smooth, default 5, but at most a third of the
curve's evaluations; the window is centred and shifted inward at the ends; K=1: the raw curve).
Why: the first crossing of a noisy curve is an early dip of noise, which biases a saving upward;
a moving average lags at the ends instead, so its final value, pulled up by earlier losses,
makes the target easier to reach (biased upward again). A local line has neither bias where the
curve is straight over K evaluations; where a loss curve bends (convex), its final value is
slightly low: a harder target, if anything. A run branched from another run's checkpoint (a WSD
decay) counts the source's compute up to the branch point too (jaxlm.reports.runs.branch_offset).

Target: the baseline's smoothed final value, the mean over its seeds; budget: the mean of their
final compute. For each seed of an arm: the first x where its smoothed curve is at or below the
target (linearly interpolated between the two evaluations around the crossing) and the saving
1 - that / budget. Each arm's cells are mean ± sample standard deviation over the seeds that
reach the target, with n; seeds that never get there are counted ("1 of 3 seeds not reached in
2e+13"). Prints a markdown table; --paper adds the papers' savings (%); --plot writes a PNG of
the smoothed curves (raw evaluations faint), the target line and each seed's crossing (y range:
the curves over the last half of training), and prints its path as its own line. Bad input is
one line on stderr, exit 2.
"""

import argparse
import os
import sys

import numpy as np

from jaxlm.reports import plots as report_plots
from jaxlm.reports import runs as report_runs
from jaxlm.reports.runs import ReportError, named_runs, print_report, read_metrics

UNITS = {"flops": "FLOPs", "tokens": "tokens"}


def crossing(xs, ys, target: float) -> float | None:
  """The first x where the piecewise-linear curve (xs, ys) reaches `target` or below."""
  for i, (x, y) in enumerate(zip(xs, ys)):
    if y <= target:
      if i == 0:
        return float(x)
      x0, y0 = xs[i - 1], ys[i - 1]
      return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
  return None


def smooth(xs, ys, k: int = 5) -> np.ndarray:
  """Each point replaced by a least-squares line through the k points around it (centred,
  shifted inward at the ends), evaluated at its x: no lag at the ends, unlike a moving average.
  At most a third of the curve's points: a short curve's last line must not reach back into the
  steep start of training (5 evaluations from step 0 would fit one line to all of it)."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  k = max(1, min(k, len(ys) // 3))
  out = np.empty_like(ys)
  for i in range(len(ys)):
    lo = min(max(i - k // 2, 0), len(ys) - k)
    dx, wy = xs[lo:lo + k] - xs[i], ys[lo:lo + k]  # x relative to the point: no cancellation.
    spread = np.sum((dx - dx.mean()) ** 2)
    slope = np.sum((dx - dx.mean()) * (wy - wy.mean())) / spread if spread > 0 else 0.0
    out[i] = wy.mean() - slope * dx.mean()
  return out


def series(run_dir: str, metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
  """(compute, metric) of one run, from the branch point if it was restored from a run."""
  found = read_metrics(run_dir, x)
  if metric not in found:
    raise ReportError(f"{run_dir}: no {metric} in metrics.jsonl")
  xs, ys = (np.asarray(v, float) for v in found[metric])
  return xs + report_runs.branch_offset(run_dir, x), ys


def mean_std(values: list[float], fmt: str, suffix: str = "") -> str:
  """'mean ± s.d. (n=K)' over seeds; one seed: 'value (n=1)'."""
  if len(values) == 1:
    return f"{values[0]:{fmt}}{suffix} (n=1)"
  return (f"{np.mean(values):{fmt}}{suffix} ± {np.std(values, ddof=1):{fmt}}{suffix} "
          f"(n={len(values)})")


def _dirs(value) -> list[str]:
  return [value] if isinstance(value, str) else list(value)


def savings_table(baseline, runs: dict, metric: str = "eval/loss", x: str = "flops",
                  paper: dict[str, str] | None = None, smooth_k: int = 5,
                  plot: str | None = None, baseline_label: str = "baseline",
                  y_label: str | None = None) -> list[str]:
  """The markdown report. `baseline`: a MODEL_DIR or a list of seeds' MODEL_DIRs; `runs`:
  {arm: MODEL_DIR or [seed MODEL_DIRs]}; `plot`: a .png path to draw the curves into, the
  baseline named `baseline_label` and the y axis `y_label` (default: the metric and its unit)."""
  paper, unit = paper or {}, UNITS[x]
  if smooth_k < 1:
    raise ReportError(f"--smooth={smooth_k}: give a number of evaluations >= 1")
  if plot is not None and not plot.endswith(".png"):
    raise ReportError(f"--plot={plot!r}: give a path ending in .png")
  base = _load(baseline, metric, x, smooth_k)
  arms = {name: _load(dirs, metric, x, smooth_k, name) for name, dirs in runs.items()}
  target = float(np.mean([s[-1] for _, _, s in base]))
  budget = float(np.mean([xs[-1] for xs, _, _ in base]))
  seeds_note = f"mean over n={len(base)} seeds" if len(base) > 1 else "n=1"
  lines = [f"Target: the baseline's smoothed final {metric} = {target:.4f} ({seeds_note}) after "
           f"{budget:.3g} {unit}; every curve smoothed by a least-squares line through "
           f"{smooth_k} evaluations (at most a third of the curve's) around each point.", "",
           f"| arm | {unit} to reach the target | saving | final {metric} (smoothed) "
           "| paper's saving |", "|---|---|---|---|---|"]
  crossings = {name: [crossing(xs, s, target) for xs, _, s in seeds]
               for name, seeds in arms.items()}
  for name, seeds in arms.items():
    lines.append(f"| {name} | " + " | ".join(_cells(seeds, crossings[name], budget))
                 + f" | {paper.get(name, '-')} |")
  if plot is not None:
    plot_curves(plot, [(baseline_label, base, []),
                       *((n, s, crossings[n]) for n, s in arms.items())], target, metric, x,
                y_label)
    lines += ["", plot]
  return lines


def _load(dirs, metric: str, x: str, k: int, name: str = "baseline") -> list[tuple]:
  """(xs, raw ys, smoothed ys) of each seed's MODEL_DIR."""
  if not _dirs(dirs):
    raise ReportError(f"{name!r} has no MODEL_DIR")
  return [(xs, ys, smooth(xs, ys, k)) for xs, ys in (series(d, metric, x) for d in _dirs(dirs))]


def _cells(seeds, reached: list[float | None], budget: float) -> list[str]:
  """(compute to the target, saving, final value) of one arm's seeds."""
  hits = [r for r in reached if r is not None]
  final = mean_std([float(s[-1]) for _, _, s in seeds], ".4f")
  if not hits:
    longest = max(xs[-1] for xs, _, _ in seeds)
    every = f" (all {len(seeds)} seeds)" if len(seeds) > 1 else ""
    return [f"not reached in {longest:.3g}{every}", "-", final]
  missed = [xs[-1] for (xs, _, _), r in zip(seeds, reached) if r is None]
  note = (f"; {len(missed)} of {len(reached)} seeds not reached in {max(missed):.3g}"
          if missed else "")
  spent = mean_std(hits, ".3g") + note
  saving = mean_std([100 * (1 - r / budget) for r in hits], ".1f", "%")
  return [spent, saving, final]


def plot_curves(path: str, arms: list[tuple[str, list, list]], target: float, metric: str,
                x: str, y_label: str | None = None):
  """Smoothed curves (raw evaluations faint) of (name, seeds, crossings) for the baseline and
  each arm, the target line and each seed's crossing; the y range covers the last half of the
  x span (jaxlm.reports.plots.y_limits), where the curves meet the target."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(8, 4.2), layout="constrained")
  ax = fig.subplots()
  shown = []
  for i, (name, seeds, crossings) in enumerate(arms):
    color = "black" if i == 0 else report_plots.series_color(i - 1, len(arms) - 1)
    label = f"{name} (n={len(seeds)})" if len(seeds) > 1 else name
    for j, (xs, ys, smoothed) in enumerate(seeds):
      ax.plot(xs, ys, ".", color=color, alpha=0.4, ms=4)
      ax.plot(xs, smoothed, color=color, lw=1.4, label=label if j == 0 else None)
      shown.append((xs, smoothed))
    hits = [c for c in crossings if c is not None]
    ax.plot(hits, [target] * len(hits), "o", color=color, mfc="white", mew=1.5, ms=6)
  ax.axhline(target, color="0.2", ls="--", lw=1, label=f"target {target:.4g}")
  x_all = np.concatenate([c[0] for c in shown])
  limits = report_plots.y_limits(shown + [(np.array([x_all.min(), x_all.max()]),
                                        np.array([target, target]))], keep=0.5)
  if limits:
    ax.set_ylim(*limits)
  ylabel = y_label or (f"{metric} (bits/byte)" if metric.endswith("bits_per_byte")
                       else f"{metric} (nats/token)" if metric.endswith("loss") else metric)
  report_plots.style_axes(ax, x, ylabel)
  ax.set_title(f"{metric} down to {arms[0][0]}'s final value (crossings circled)")
  ax.legend(fontsize="small", loc="upper right")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return fig


def _paper_savings(text: str) -> dict[str, str]:
  """--paper=NAME:PERCENT,... as {name: 'PERCENT%'}."""
  pairs = {}
  for item in filter(None, text.split(",")):
    name, sep, percent = item.partition(":")
    if not sep:
      raise ReportError(f"--paper item {item!r}: expected NAME:PERCENT")
    pairs[name] = f"{percent}%"
  return pairs


def _baseline_dirs(text: str) -> list[str]:
  dirs = text.split(",")
  if not all(dirs):
    raise ReportError(f"--baseline={text!r}: expected DIR[,DIR...]")
  return dirs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="NAME=DIR[,DIR...] for each arm (DIRs: seeds)")
  parser.add_argument("--baseline", required=True,
                      help="DIR[,DIR...]: the run (seeds) whose smoothed final value is the target")
  parser.add_argument("--metric", default="eval/loss")
  parser.add_argument("--x", default="flops", choices=("flops", "tokens"))
  parser.add_argument("--smooth", type=int, default=5,
                      help="evaluations per local line fit (1: no smoothing)")
  parser.add_argument("--paper", default="", help="NAME:PERCENT,... the papers' savings")
  parser.add_argument("--plot", default=None, help="PATH.png: draw the curves and the target")
  parser.add_argument("--baseline_label", default="baseline", help="the baseline's name in the plot")
  parser.add_argument("--y_label", default=None, help="the plot's y axis (default: the metric)")
  args = parser.parse_args(argv)
  return print_report(lambda: savings_table(
      _baseline_dirs(args.baseline), named_runs(args.runs), args.metric, args.x,
      _paper_savings(args.paper), args.smooth, args.plot, args.baseline_label, args.y_label))


if __name__ == "__main__":
  sys.exit(main())
