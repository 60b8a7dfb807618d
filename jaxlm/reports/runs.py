"""Training runs read back from their MODEL_DIR/metrics.jsonl for reports: each metric's series
against steps, tokens or FLOPs (a resumed run's last record of a step wins), where the stages
begin, where a branch restored from another run starts (so it can be drawn from its branch
point), the mean and spread over seeds, and the report tools' NAME=DIR[,DIR...] arguments.
"""

import ast
import json
import math
import os
import re
import sys
from typing import Callable

import numpy as np


X_KEYS = {"step": "step", "tokens": "total/tokens", "flops": "total/flops"}



X_LABELS = {"step": "step", "tokens": "tokens", "flops": "FLOPs"}



TOKENIZER_TOLERANCE = 1.05  # Bytes-per-token ratios further apart: different tokenizers.



class ReportError(ValueError):
  """Bad input: reported as one line on stderr by the CLI (exit 2)."""


Curve = tuple[np.ndarray, np.ndarray]  # (xs, ys), in step order.



def _records(run_dir: str) -> list[tuple[int, dict]]:
  """(line number, record) of every complete line of a run's metrics.jsonl, in file order."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ReportError(f"{run_dir}: no metrics.jsonl (is it a MODEL_DIR?)")
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
    raise ReportError(f"unknown --x={x!r}: choose one of {', '.join(X_KEYS)}")
  points: dict[str, dict[int, tuple[float, float]]] = {}
  for line_no, record in _records(run_dir):
    step = record["step"]
    if X_KEYS[x] not in record:
      raise ReportError(f"{os.path.join(run_dir, 'metrics.jsonl')}:{line_no}: record at step "
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
  except ReportError:  # A Hugging Face directory, or a run not on this disk.
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
      raise ReportError(f"{item!r}: expected NAME=DIR[,DIR...]")
    if name in runs:
      raise ReportError(f"{item!r}: the name {name!r} is given twice (seeds of one arm are "
                      "NAME=DIR,DIR)")
    runs[name] = dir_list
  return runs



def print_report(make_lines: Callable[[], list[str]]) -> int:
  """A report tool's main: prints the lines, or a ReportError as one line on stderr (exit 2)."""
  try:
    print("\n".join(make_lines()))
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
