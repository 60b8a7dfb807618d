"""One point per arm: a final metric against a sum of final metrics (held-out loss against the
bytes of params plus optimizer state), mean ± sample standard deviation over each arm's seeds,
as a markdown table and a PNG.

    python tools/plot_tradeoff.py --y=eval_final/wiki/loss \
        --x=memory/param_bytes+memory/support_bytes+memory/optimizer_state_bytes \
        --out=plots/memory.png adamw=runs/adamw,runs/seed1/adamw galore=runs/galore

Each run is NAME=DIR[,DIR...] (several DIRs: seeds of one arm); a metric is each run's last
logged value. The table is printed, then the PNG's path; an arm none of whose DIRs has logged
the metrics yet (a reproduction still running) is named under the table and left out. Bad input
is one line on stderr, exit 2.
"""

import argparse
import os
import sys

from jaxlm.reports.runs import ReportError, named_runs, print_report, read_metrics
from jaxlm.reports.tables import spread

def final(run_dir: str, metric: str) -> float | None:
  series = read_metrics(run_dir, "step") if os.path.isdir(run_dir) else {}
  values = series.get(metric, ([], []))[1]
  return values[-1] if values else None


def arm_points(dirs: list[str], y: str, xs: list[str]) -> tuple[list[float], list[float]]:
  """(x of each seed, y of each seed), over the seeds that logged every metric."""
  seeds = [[final(d, m) for m in (y, *xs)] for d in dirs]
  seeds = [s for s in seeds if None not in s]
  return [sum(s[1:]) for s in seeds], [s[0] for s in seeds]


def plot(points: dict, x_label: str, y_label: str, out: str, scale: float) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name, (xs, ys) in points.items():
    (x, x_std), (y, y_std) = spread(xs), spread(ys)
    ax.errorbar(x / scale, y, xerr=x_std / scale, yerr=y_std, fmt="o", capsize=4, label=name)
    ax.annotate(name, (x / scale, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
  ax.margins(x=0.15, y=0.15)  # Room for the names beside the points.
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.ticklabel_format(axis="y", useOffset=False)
  ax.grid(alpha=0.3)
  ax.set_title("mean ± s.d. over seeds", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def report(runs: dict[str, list[str]], y: str, xs: list[str], out: str, y_label: str,
           x_label: str) -> list[str]:
  unit, scale = ("MiB", 2**20) if all(m.endswith("bytes") for m in xs) else ("", 1.0)
  x_name = " + ".join(xs) + (f" ({unit})" if unit else "")
  points = {name: arm_points(dirs, y, xs) for name, dirs in runs.items()}
  waiting = [name for name, (_, ys) in points.items() if not ys]
  points = {name: p for name, p in points.items() if p[1]}
  if not points:
    raise ReportError(f"no run has logged {y} and {' and '.join(xs)} yet")
  lines = [f"| arm | {x_name} | {y} | seeds |", "|---|---|---|---|"]
  for name, (xs_, ys) in points.items():
    (x, x_std), (v, v_std) = spread(xs_), spread(ys)
    lines.append(f"| {name} | {x / scale:,.2f} ± {x_std / scale:.2g} | {v:.4f} ± {v_std:.2g} | "
                 f"{len(ys)} |")
  if waiting:
    lines += ["", f"Not finished yet: {', '.join(waiting)}."]
  plot(points, x_label or x_name, y_label or y, out, scale)
  return lines + ["", out]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="NAME=DIR[,DIR...] for each arm (DIRs: seeds)")
  parser.add_argument("--y", required=True, help="the metric on the y axis")
  parser.add_argument("--x", required=True, help="METRIC[+METRIC...]: their sum on the x axis")
  parser.add_argument("--y_label", default="", help="the y axis' label, with its unit")
  parser.add_argument("--x_label", default="", help="the x axis' label (default: the sum, in MiB "
                      "for bytes)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  args = parser.parse_args(argv)
  return print_report(lambda: report(named_runs(args.runs), args.y, args.x.split("+"),
                                     args.out, args.y_label, args.x_label))


if __name__ == "__main__":
  sys.exit(main())
