"""PNG plots comparing training runs, read from each run's MODEL_DIR/metrics.jsonl.

    python tools/plot_runs.py runs/base runs/wider
    python tools/plot_runs.py base=runs/base_s0,runs/base_s1 muon=runs/muon_s0,runs/muon_s1 \
        --x=tokens --out=plots/tokens --target=eval/loss:2.16

A run argument is DIR (named by its basename) or NAME=DIR[,DIR...]: several MODEL_DIRs are seeds
of one arm, drawn as their mean with a band of +-1 standard deviation over the seeds (sample
s.d.; at the first seed's x points inside every seed's x range, other seeds interpolated there)
and "(n=K)" in the legend; one DIR is a plain line. x is steps, tokens (total/tokens) or FLOPs
(total/flops). Files written into --out (default: plots/ beside the first DIR):

    train_loss.png          train/loss (nats/token)
    eval_loss.png           eval/<domain>/loss, one panel per domain (and eval/loss as "all")
    eval_bits_per_byte.png  eval/<domain>/bits_per_byte, likewise: bits per byte never shares
                            an axis with nats per token
    learning_rate.png       train/learning_rate
    throughput.png          perf/tokens_per_sec
    forgetting.png          forgetting/<domain>, one panel per domain (and forgetting/all)

Rules:
- y range of the loss figures (train loss, eval loss, bits per byte): every curve, band and
  target over the last 75% of the panel's x span (a curve ending before that: its last point),
  plus 10% margin. The steep first quarter of training is cut off so that differences of
  0.01-0.1 between arms at the end are visible; the x axis still shows all of training.
- Units: nats per token are comparable only between runs that tokenize alike. Where the runs'
  tokenizers differ (their final eval loss over bits per byte, ln 2 times the eval text's bytes
  per token, differs by over 5% on a domain), the nats-per-token figures (train loss, eval
  loss, forgetting) are not drawn; eval_bits_per_byte.png is the comparison.
- Forgetting (eval loss minus the stage's first evaluation) is drawn only where a stage follows
  another: in a run that started from another run's checkpoint, or after the second stage of a
  run began (a stage start is a data/proportion record followed by the stage's baseline
  evaluation at the same step; a resume writes the proportions but no baseline).
- Branches: a run restored from another run's checkpoint (MODEL_DIR/restore_report.json, or
  else RestoreConfig.path/step in MODEL_DIR/config.gin) starts counting steps, tokens and FLOPs
  at 0; it is drawn from its branch point, x offset by the source run's x at the restored step,
  so that its first point lies on the source's curve. A source without metrics.jsonl (a Hugging
  Face directory, or a run not on this disk): drawn from 0.
- A resumed run may log a step twice: the last record of each (step, key) wins.
- x tick labels use SI prefixes (100k, 1.5M, 2G).

From Python: `plot_runs({name: [dir, ...]}, out_dir, x="tokens", targets={"eval/loss": 2.16})
-> [paths]` (`targets`: a dashed "target" line in the panels of that metric); `figures(...)` the
same as matplotlib Figures; `read_metrics(run_dir, x)` one run's series as {key: (xs, ys)};
`named_runs(items)` the report tools' NAME=DIR[,DIR...] arguments as {name: [dir, ...]}. Bad
input (a DIR without metrics.jsonl, an unknown --x, a record without the x axis's key, NAME=
without a DIR) is one line on stderr, exit 2.
"""

import argparse
import ast
import json
import math
import os
import re
import sys
from typing import Callable, NamedTuple

import numpy as np

X_KEYS = {"step": "step", "tokens": "total/tokens", "flops": "total/flops"}
X_LABELS = {"step": "step", "tokens": "tokens", "flops": "FLOPs"}
ZOOM_KEEP = 0.75  # The loss figures' y range covers the last 75% of the x span.
TOKENIZER_TOLERANCE = 1.05  # Bytes-per-token ratios further apart: different tokenizers.


class PlotError(ValueError):
  """Bad input: reported as one line on stderr by the CLI (exit 2)."""


Curve = tuple[np.ndarray, np.ndarray]  # (xs, ys), in step order.


def _records(run_dir: str) -> list[tuple[int, dict]]:
  """(line number, record) of every complete line of a run's metrics.jsonl, in file order."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"{run_dir}: no metrics.jsonl (is it a MODEL_DIR?)")
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        record["step"] = int(record["step"])
      except (ValueError, KeyError, TypeError):
        continue  # A line cut off by a killed process.
      out.append((line_no, record))
  return out


def _points(run_dir: str, x: str) -> dict[str, dict[int, tuple[float, float]]]:
  """{key: {step: (x, y)}}; the last record of each (step, key) wins."""
  if x not in X_KEYS:
    raise PlotError(f"unknown --x={x!r}: choose one of {', '.join(X_KEYS)}")
  points: dict[str, dict[int, tuple[float, float]]] = {}
  for line_no, record in _records(run_dir):
    step = record["step"]
    if X_KEYS[x] not in record:
      raise PlotError(f"{os.path.join(run_dir, 'metrics.jsonl')}:{line_no}: record at step "
                      f"{step} lacks {X_KEYS[x]} (needed for --x={x})")
    x_value = float(record[X_KEYS[x]])
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        points.setdefault(key, {})[step] = (x_value, float(value))
  return points


def read_metrics(run_dir: str, x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
  """{key: (xs, ys)} for every metric of a run, in step order, x from each record's X_KEYS[x].
  The last record of each (step, key) wins; a partial or malformed line is skipped."""
  series = {}
  for key, by_step in _points(run_dir, x).items():
    pairs = [by_step[s] for s in sorted(by_step)]
    series[key] = ([p[0] for p in pairs], [p[1] for p in pairs])
  return series


def stage_starts(run_dir: str) -> list[int]:
  """Steps at which a stage of the run began. The trainer writes data/proportion/* whenever a
  stage (re)starts, and, only at the stage's first step, its baseline evaluation right after."""
  records = [r for _, r in _records(run_dir)]
  return [rec["step"] for prev, rec in zip(records, records[1:])
          if rec["step"] == prev["step"] and "eval/loss" in rec
          and any(k.startswith("data/proportion/") for k in prev)]


def restore_point(run_dir: str) -> tuple[str, int | None] | None:
  """(source MODEL_DIR, step or None for its latest) the run was restored from, else None."""
  report = os.path.join(run_dir, "restore_report.json")
  if os.path.isfile(report):  # Written by the restore itself, with the step it resolved.
    try:
      with open(report, encoding="utf-8") as f:
        found = json.load(f)
      return str(found["source"]), (None if found.get("step") is None else int(found["step"]))
    except (ValueError, KeyError, TypeError):
      pass
  return _restore_point_in_config(os.path.join(run_dir, "config.gin"))


def _restore_point_in_config(path: str) -> tuple[str, int | None] | None:
  """RestoreConfig.path / .step of a run's config.gin (macros resolved), if a stage restores."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    bindings = dict(re.findall(r"^([\w./]+) = (.+)$", f.read(), re.MULTILINE))
  if not any(k.endswith("restore_from") and "RestoreConfig" in v for k, v in bindings.items()):
    return None

  def value(key):
    text = bindings.get(key, "None")
    while text.startswith("%"):  # A macro: MACRO = value, elsewhere in the file.
      text = bindings.get(text[1:], "None")
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return None

  source, step = value("RestoreConfig.path"), value("RestoreConfig.step")
  if not isinstance(source, str):
    return None
  return source, step if isinstance(step, int) else None


def branch_offset(run_dir: str, x: str, seen: frozenset = frozenset()) -> float:
  """The source run's x at the step this run was restored from (0 if it was not restored, or
  its source is not on this disk). A branch of a branch adds its source's offset."""
  point = restore_point(run_dir)
  if point is None or os.path.abspath(point[0]) in seen:
    return 0.0
  source, step = point
  try:
    series = read_metrics(source, "step")
  except PlotError:  # A Hugging Face directory, or a run not on this disk.
    return 0.0
  steps = sorted({s for xs, _ in series.values() for s in xs})
  if not steps:
    return 0.0
  step = steps[-1] if step is None else step
  if x == "step":
    at = float(step)
  elif X_KEYS[x] in series:
    at = float(np.interp(step, *series[X_KEYS[x]]))
  else:
    return 0.0
  return at + branch_offset(source, x, seen | {os.path.abspath(run_dir)})


def run_curves(run_dir: str, x: str) -> dict[str, Curve]:
  """One MODEL_DIR's curves as plotted: x offset to the branch point, and forgetting kept only
  in a stage that follows another (see the module docstring)."""
  points = _points(run_dir, x)
  if restore_point(run_dir) is not None:
    first_followed = -math.inf  # Its first stage follows the source run's.
  else:
    starts = stage_starts(run_dir)
    first_followed = starts[1] if len(starts) > 1 else math.inf
  offset = branch_offset(run_dir, x)
  curves = {}
  for key, by_step in points.items():
    steps = sorted(s for s in by_step
                   if not key.startswith("forgetting/") or s > first_followed)
    if steps:
      curves[key] = (np.array([by_step[s][0] for s in steps]) + offset,
                     np.array([by_step[s][1] for s in steps]))
  return curves


def mean_band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(xs, mean, sample s.d.) over seeds' curves: at the first seed's x points that lie in every
  seed's x range, each seed linearly interpolated there (exact where they log the same x).
  One curve: itself, s.d. 0."""
  xs = np.asarray(curves[0][0], float)
  low, high = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
  xs = xs[(xs >= low) & (xs <= high)]
  ys = np.array([np.interp(xs, cx, cy) for cx, cy in curves])
  std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
  return xs, ys.mean(axis=0), std


def y_limits(curves: list[Curve], keep: float = ZOOM_KEEP,
             margin: float = 0.1) -> tuple[float, float] | None:
  """(low, high) covering every curve over the last `keep` of their joint x span (a curve that
  ends before it: its last point), widened by `margin` of the range on each side."""
  curves = [(np.asarray(cx, float), np.asarray(cy, float)) for cx, cy in curves if len(cx)]
  if not curves:
    return None
  x_low, x_high = min(cx.min() for cx, _ in curves), max(cx.max() for cx, _ in curves)
  start = x_high - keep * (x_high - x_low)
  values = np.concatenate([cy[cx >= start] if np.any(cx >= start) else cy[-1:]
                           for cx, cy in curves])
  values = values[np.isfinite(values)]
  if not len(values):
    return None
  low, high = float(values.min()), float(values.max())
  pad = margin * (high - low) or 0.01 * abs(high) or 0.01
  return low - pad, high + pad


def tokenizers_differ(runs: list[dict[str, Curve]]) -> bool:
  """Whether nats per token are incomparable between the runs: final eval loss over bits per
  byte (ln 2 times the eval text's bytes per token) differs on a domain they share."""
  ratios: dict[str, list[float]] = {}
  for curves in runs:
    for key, (_, bits) in curves.items():
      loss = curves.get(key[:-len("bits_per_byte")] + "loss") if key.endswith(
          "/bits_per_byte") else None
      if loss is not None and bits[-1] > 0 and loss[1][-1] > 0:
        ratios.setdefault(key, []).append(loss[1][-1] / bits[-1])
  return any(max(r) / min(r) > TOKENIZER_TOLERANCE for r in ratios.values())


class Spec(NamedTuple):
  """One figure: each key `prefix + sub + suffix` (sub without "/") is a panel titled sub;
  `whole` is the single series' key, or the "all" panel's."""
  stem: str
  title: str
  prefix: str | None
  suffix: str | None
  whole: str | None
  ylabel: str
  zoom: bool  # y range from the end of training (loss figures).
  per_token: bool  # In nats per token: not drawn where the tokenizers differ.


PLOTS = [
    Spec("train_loss", "train loss", None, None, "train/loss", "train loss (nats/token)",
         True, True),
    Spec("eval_loss", "eval loss", "eval/", "/loss", "eval/loss", "eval loss (nats/token)",
         True, True),
    Spec("eval_bits_per_byte", "eval bits per byte", "eval/", "/bits_per_byte",
         "eval/bits_per_byte", "eval loss (bits/byte)", True, False),
    Spec("learning_rate", "learning rate", None, None, "train/learning_rate", "learning rate",
         False, False),
    Spec("throughput", "throughput", None, None, "perf/tokens_per_sec", "throughput (tokens/s)",
         False, False),
    Spec("forgetting", "forgetting (eval loss minus the stage's first evaluation)",
         "forgetting/", "", None, "forgetting (nats/token)", False, True),
]


def _panels(keys: set[str], spec: Spec) -> dict[str, str]:
  """Panel title -> metric key, for the keys any run has."""
  panels = {}
  if spec.prefix is not None:
    for key in sorted(keys):
      if not (key.startswith(spec.prefix) and key.endswith(spec.suffix)):
        continue
      sub = key[len(spec.prefix):len(key) - len(spec.suffix)]
      if sub and "/" not in sub:
        panels[sub] = key
  if spec.whole is not None and spec.whole in keys:
    panels["all" if spec.prefix is not None else ""] = spec.whole
  if "all" in panels:  # forgetting/all, eval/loss: last.
    panels["all"] = panels.pop("all")
  return panels


def named_runs(items: list[str], plain: bool = False) -> dict[str, list[str]]:
  """NAME=DIR[,DIR...] command-line items as {name: [dir, ...]}, in order: several DIRs are
  seeds of one arm. `plain`: an item without "=" is one DIR named by its basename."""
  runs = {}
  for item in items:
    name, sep, dirs = item.partition("=")
    if plain and not sep:
      name, dirs = os.path.basename(os.path.normpath(item)), item
    dir_list = dirs.split(",") if sep else [dirs]
    if not name or not (sep or plain) or not all(dir_list):
      raise PlotError(f"{item!r}: expected NAME=DIR[,DIR...]")
    if name in runs:
      raise PlotError(f"{item!r}: the name {name!r} is given twice (seeds of one arm are "
                      "NAME=DIR,DIR)")
    runs[name] = dir_list
  return runs


def print_report(make_lines: Callable[[], list[str]]) -> int:
  """A report tool's main: prints the lines, or a PlotError as one line on stderr (exit 2)."""
  try:
    print("\n".join(make_lines()))
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def style_axes(ax, x: str, ylabel: str) -> None:
  """Axis labels with units, SI x ticks (no "100000150000"), no offset on the y ticks."""
  from matplotlib.ticker import EngFormatter, MaxNLocator  # pylint: disable=import-outside-toplevel
  ax.set_xlabel(X_LABELS[x])
  ax.set_ylabel(ylabel)
  ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
  ax.xaxis.set_major_formatter(EngFormatter(sep=""))
  if "tokens/s" in ylabel:
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
  else:
    ax.ticklabel_format(axis="y", useOffset=False)
  ax.grid(alpha=0.3)


def _draw_panel(ax, key: str, arms: dict[str, list[dict[str, Curve]]], spec: Spec,
                target: float | None) -> None:
  """Each arm's mean line (and band over its seeds) for one metric, the target, the y range."""
  shown: list[Curve] = []
  for i, (name, seeds) in enumerate(arms.items()):
    curves = [s[key] for s in seeds if key in s]
    if not curves:
      continue
    xs, mean, std = mean_band(curves)
    label = f"{name} (n={len(seeds)})" if len(seeds) > 1 else name
    ax.plot(xs, mean, label=label, color=f"C{i % 10}", marker="." if len(xs) < 30 else None)
    if len(curves) > 1:
      ax.fill_between(xs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2, lw=0)
    shown += [(xs, mean - std), (xs, mean + std)]
  if target is not None:
    ax.axhline(target, color="0.2", ls="--", lw=1, label=f"target {target:.4g}")
    xs = np.concatenate([c[0] for c in shown])
    if len(xs):  # The target as a flat curve over the panel: inside the y range.
      shown.append((np.array([xs.min(), xs.max()]), np.array([target, target])))
  limits = y_limits(shown) if spec.zoom else None
  if limits:
    ax.set_ylim(*limits)


def _figure(spec: Spec, arms: dict[str, list[dict[str, Curve]]], x: str,
            targets: dict[str, float]):
  """One figure of PLOTS, or None where no run has its metrics."""
  from matplotlib.figure import Figure  # No pyplot: no global state, no display backend.
  panels = _panels(set().union(*(s for seeds in arms.values() for s in seeds)), spec)
  if not panels:
    return None
  cols = min(len(panels), 3)
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4.2 * cols + 2.2, 3.3 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (panel, key) in zip(axes, panels.items()):
    _draw_panel(ax, key, arms, spec, targets.get(key))
    if spec.stem == "forgetting":  # Above the line: forgotten; below: still learning.
      ax.axhline(0.0, color="0.5", lw=0.8)
    style_axes(ax, x, spec.ylabel)
    ax.set_title(panel or None)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  handles = {}  # One legend for the figure: each label once.
  for ax in axes[:len(panels)]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  seeds = any(len(s) > 1 for s in arms.values())
  fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small",
             title="(n=K): mean ± 1 s.d. of K seeds" if seeds else None, title_fontsize="small")
  fig.suptitle(spec.title)
  return fig


def figures(runs: dict[str, list[str]], x: str = "step",
            targets: dict[str, float] | None = None) -> dict:
  """{file stem: matplotlib Figure} of every figure of PLOTS that any run has data for."""
  if not runs:
    raise PlotError("no runs given")
  runs = {name: [dirs] if isinstance(dirs, str) else list(dirs) for name, dirs in runs.items()}
  for name, dirs in runs.items():
    if not dirs:
      raise PlotError(f"run {name!r} has no MODEL_DIR")
  arms = {name: [run_curves(d, x) for d in dirs] for name, dirs in runs.items()}
  mixed_units = tokenizers_differ([s for seeds in arms.values() for s in seeds])
  out = {}
  for spec in PLOTS:
    if spec.per_token and mixed_units:
      continue
    fig = _figure(spec, arms, x, targets or {})
    if fig is not None:
      out[spec.stem] = fig
  return out


def plot_runs(runs: dict[str, list[str]], out_dir: str, x: str = "step",
              targets: dict[str, float] | None = None) -> list[str]:
  """Writes the PNGs of PLOTS that any run has data for into out_dir; returns their paths.
  `runs`: {arm name: [MODEL_DIR of each seed]}; `targets`: {metric key: target value}."""
  made = figures(runs, x, targets)  # Raises before anything is written.
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for stem, fig in made.items():
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path, dpi=100)
    written.append(path)
  return written


def _target(text: str) -> tuple[str, float]:
  key, _, value = text.rpartition(":")
  try:
    if key:
      return key, float(value)
  except ValueError:
    pass
  raise PlotError(f"--target={text!r}: expected METRIC:VALUE, e.g. eval/loss:2.16")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("runs", nargs="+", metavar="RUN",
                      help="DIR or NAME=DIR[,DIR...]: MODEL_DIRs with metrics.jsonl (several: "
                           "seeds of one arm)")
  parser.add_argument("--x", default="step", help="x axis: step, tokens or flops")
  parser.add_argument("--out", default=None,
                      help="folder for the PNGs (default: plots/ beside the first DIR)")
  parser.add_argument("--target", action="append", default=[],
                      help="METRIC:VALUE, a target line in that metric's panels (repeatable)")
  args = parser.parse_args(argv)
  try:
    runs = named_runs(args.runs, plain=True)
    targets = dict(_target(t) for t in args.target)
    first = next(iter(runs.values()))[0]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(first)), "plots")
    paths = plot_runs(runs, out, x=args.x, targets=targets)
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
