"""PNG plots comparing training runs, read from each run's MODEL_DIR/metrics.jsonl.

    python tools/plot_runs.py runs/base runs/wider
    python tools/plot_runs.py runs/base runs/wider --x=tokens --out=plots/tokens
    python tools/plot_runs.py /tmp/a /tmp/b --x=flops --names=baseline,muon

One line per run in every figure, labelled by --names (default: each DIR's basename), against
steps, tokens (total/tokens) or FLOPs (total/flops). Files written into --out (default: plots/
beside the first DIR):

    train_loss.png      train/loss
    eval_loss.png       eval/<domain>/loss, one subplot per domain (and eval/loss as "all")
    learning_rate.png   train/learning_rate
    throughput.png      perf/tokens_per_sec
    forgetting.png      forgetting/<domain>, one subplot per domain (and forgetting/all)

A figure that no run has data for is skipped. A resumed run may log a step twice: the last record
of each (step, key) wins. From Python: `plot_runs(run_dirs, out_dir, x="tokens") -> [paths]`;
`read_metrics(run_dir, x)` gives one run's series as {key: (xs, ys)}. Bad input (a DIR without
metrics.jsonl, an unknown --x, a record without the x axis's key) is one line on stderr, exit 2.
"""

import argparse
import json
import math
import os
import sys
from typing import Callable

X_KEYS = {"step": "step", "tokens": "total/tokens", "flops": "total/flops"}
X_LABELS = {"step": "step", "tokens": "tokens", "flops": "FLOPs"}


class PlotError(ValueError):
  """Bad input: reported as one line on stderr by the CLI (exit 2)."""


def read_metrics(run_dir: str, x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
  """{key: (xs, ys)} for every metric of a run, in step order, x from each record's X_KEYS[x].
  The last record of each (step, key) wins; a partial or malformed line is skipped."""
  if x not in X_KEYS:
    raise PlotError(f"unknown --x={x!r}: choose one of {', '.join(X_KEYS)}")
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"{run_dir}: no metrics.jsonl (is it a MODEL_DIR?)")
  points: dict[str, dict[int, tuple[float, float]]] = {}  # key -> step -> (x, y)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        step = int(record["step"])
      except (ValueError, KeyError, TypeError):
        continue  # A line cut off by a killed process.
      if X_KEYS[x] not in record:
        raise PlotError(f"{path}:{line_no}: record at step {step} lacks {X_KEYS[x]} "
                        f"(needed for --x={x})")
      x_value = float(record[X_KEYS[x]])
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          points.setdefault(key, {})[step] = (x_value, float(value))
  series = {}
  for key, by_step in points.items():
    pairs = [by_step[s] for s in sorted(by_step)]
    series[key] = ([p[0] for p in pairs], [p[1] for p in pairs])
  return series


# (file stem, title, prefix, suffix, whole): each key `prefix + sub + suffix` (sub without "/") is
# a subplot titled sub; `whole` is the single series' key, or the "all" subplot's.
PLOTS = [
    ("train_loss", "train loss", None, None, "train/loss"),
    ("eval_loss", "eval loss", "eval/", "/loss", "eval/loss"),
    ("learning_rate", "learning rate", None, None, "train/learning_rate"),
    ("throughput", "throughput (tokens/s)", None, None, "perf/tokens_per_sec"),
    ("forgetting", "forgetting (eval loss minus stage baseline)", "forgetting/", "", None),
]


def _panels(keys: set[str], prefix: str | None, suffix: str | None,
            whole: str | None) -> dict[str, str]:
  """Panel title -> metric key, for the keys any run has."""
  panels = {}
  if prefix is not None:
    for key in sorted(keys):
      if not (key.startswith(prefix) and key.endswith(suffix)):
        continue
      sub = key[len(prefix):len(key) - len(suffix)]
      if sub and "/" not in sub:
        panels[sub] = key
  if whole is not None and whole in keys:
    panels["all" if prefix is not None else ""] = whole
  if "all" in panels:  # forgetting/all, eval/loss: last.
    panels["all"] = panels.pop("all")
  return panels


def named_runs(items: list[str]) -> dict[str, str]:
  """NAME=DIR command-line items as {name: dir}, in order (the report tools' run arguments)."""
  runs = {}
  for item in items:
    name, sep, run_dir = item.partition("=")
    if not sep or not name or not run_dir:
      raise PlotError(f"{item!r}: expected NAME=DIR")
    runs[name] = run_dir
  return runs


def print_report(make_lines: Callable[[], list[str]]) -> int:
  """A report tool's main: prints the lines, or a PlotError as one line on stderr (exit 2)."""
  try:
    print("\n".join(make_lines()))
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def plot_runs(run_dirs: list[str], out_dir: str, x: str = "step",
              names: list[str] | None = None) -> list[str]:
  """Writes the PNGs of PLOTS that any run has data for into out_dir; returns their paths."""
  if not run_dirs:
    raise PlotError("no run directories given")
  names = list(names) if names else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  if len(names) != len(run_dirs):
    raise PlotError(f"{len(names)} names for {len(run_dirs)} runs")
  runs = [read_metrics(d, x) for d in run_dirs]  # Raises before anything is written.
  from matplotlib.figure import Figure  # No pyplot: no global state, no display backend.

  os.makedirs(out_dir, exist_ok=True)
  keys = set().union(*runs)
  written = []
  for stem, title, prefix, suffix, whole in PLOTS:
    panels = _panels(keys, prefix, suffix, whole)
    if not panels:
      continue
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (panel, key) in zip(axes, panels.items()):
      for name, series in zip(names, runs):
        if key in series:
          xs, ys = series[key]
          ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
      ax.set_title(panel or title)
      ax.set_xlabel(X_LABELS[x])
      ax.grid(alpha=0.3)
      ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
      ax.set_visible(False)
    if len(panels) > 1 or prefix is not None:
      fig.suptitle(title)
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path, dpi=100)
    written.append(path)
  return written


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("run_dirs", nargs="+", metavar="DIR", help="MODEL_DIRs with metrics.jsonl")
  parser.add_argument("--x", default="step", help="x axis: step, tokens or flops")
  parser.add_argument("--out", default=None,
                      help="folder for the PNGs (default: plots/ beside the first DIR)")
  parser.add_argument("--names", default=None, help="comma-separated legend names, one per DIR")
  args = parser.parse_args(argv)
  names = args.names.split(",") if args.names else None
  try:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.run_dirs[0])), "plots")
    paths = plot_runs(args.run_dirs, out, x=args.x, names=names)
  except PlotError as e:
    print(f"plot_runs: error: {e}", file=sys.stderr)
    return 2
  if not paths:
    print("plot_runs: no run has any of the plotted metrics", file=sys.stderr)
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
