"""A finished run's record: the few small files its tables, plots and reports read, kept in the
repository (experiments/FAMILY/runs/) so that a reproduction survives the machine it ran on.

A reproduction is hours of CPU; the runs folder (checkpoints, TensorBoard logs) stays on the
machine that trained it. The record is what outlives it: done.json (final metrics, wall time),
metrics.jsonl (every logged curve), config.gin (the operative config) and restore_report.json
(where a branch was restored from, which its compute axis adds). Paths inside them name the
family's runs folder as `{family_runs}`, so a record put back into another runs folder points at
its neighbours there. A run restored from a record has no checkpoint: an arm that restores it
must train it again (tools/reproduce.py decides which).
"""

import os

# done.json last: a record half put back (a kill) is not taken for a finished run.
RECORD_FILES = ("metrics.jsonl", "config.gin", "restore_report.json", "done.json")
RUNS_TOKEN = "{family_runs}"


def has_record(record_dir: str) -> bool:
  return os.path.isfile(os.path.join(record_dir, "done.json"))


def save_record(model_dir: str, record_dir: str, family_runs: str) -> bool:
  """Copies a finished run's record files into record_dir (the family runs folder's path
  written as RUNS_TOKEN); returns whether anything changed."""
  changed = False
  for name in RECORD_FILES:
    source = os.path.join(model_dir, name)
    if not os.path.isfile(source):
      continue
    text = _read(source).replace(os.path.abspath(family_runs), RUNS_TOKEN)
    target = os.path.join(record_dir, name)
    if os.path.isfile(target) and _read(target) == text:
      continue
    os.makedirs(record_dir, exist_ok=True)
    _write(target, text)
    changed = True
  return changed


def restore_record(record_dir: str, model_dir: str, family_runs: str) -> None:
  """Puts a record back as a finished run (no checkpoint) under family_runs."""
  os.makedirs(model_dir, exist_ok=True)
  for name in RECORD_FILES:
    source = os.path.join(record_dir, name)
    if os.path.isfile(source):
      _write(os.path.join(model_dir, name),
             _read(source).replace(RUNS_TOKEN, os.path.abspath(family_runs)))


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
