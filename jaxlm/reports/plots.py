"""PNG figures comparing runs (the rules are tools/plot_runs.py's docstring): one figure per
metric family, one panel per domain, arms drawn as their seeds' mean with a +-1 s.d. band."""

import math
import os
from typing import NamedTuple

import numpy as np

from jaxlm.reports.runs import (X_LABELS, Curve, ReportError, mean_band, run_curves,
                                tokenizers_differ)


ZOOM_KEEP = 0.75  # The loss figures' y range covers the last 75% of the x span.



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



def series_color(index: int, count: int):
  """Matplotlib's default colours for up to 10 series; past 10 the default cycle repeats, so
  tab20's 20 distinct colours instead."""
  if count <= 10:
    return f"C{index % 10}"
  import matplotlib  # pylint: disable=import-outside-toplevel
  return matplotlib.colormaps["tab20"](index % 20)


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
    color = series_color(i, len(arms))
    ax.plot(xs, mean, label=label, color=color, marker="." if len(xs) < 30 else None)
    if len(curves) > 1:
      ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, lw=0)
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
    raise ReportError("no runs given")
  runs = {name: [dirs] if isinstance(dirs, str) else list(dirs) for name, dirs in runs.items()}
  for name, dirs in runs.items():
    if not dirs:
      raise ReportError(f"run {name!r} has no MODEL_DIR")
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


def remove_stale_plots(plots_dir: str, written) -> None:
  """PNGs under plots_dir that this regeneration did not write (a figure no longer drawn) go,
  so the folder holds exactly what the README shows."""
  keep = {os.path.abspath(p) for p in written}
  for folder, _, files in os.walk(plots_dir):
    for name in files:
      path = os.path.abspath(os.path.join(folder, name))
      if name.endswith(".png") and path not in keep:
        os.remove(path)
