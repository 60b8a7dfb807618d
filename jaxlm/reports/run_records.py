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


def seed_dir(family_runs: str, arm: str, seed: int) -> str:
  """Seed 0 of an arm in RUNS/ARM (as single-seed families always were), seed k in
  RUNS/seed{k}/ARM; records are laid out the same way."""
  return os.path.join(family_runs, *([f"seed{seed}"] if seed else []), arm)


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


def put_back(every: list[tuple[str, int]], listed: set, restores: dict[str, list[str]],
             family_runs: str, records: str, family: str) -> None:
  """Puts back, as finished runs, the records of the (arm, seed)s in `every` not finished under
  family_runs -- except where a job still to train restores that arm: a record has no
  checkpoint, so that arm trains again (and so on up the chain). `every` lists an arm after
  the arms it restores; `listed`: the jobs this invocation may train; `restores`: arm -> the
  arms it restores."""
  def done(name, k):
    return os.path.exists(os.path.join(seed_dir(family_runs, name, k), "done.json"))

  def recorded(name, k):
    return has_record(seed_dir(records, name, k))
  must_train = set()
  for name, k in reversed(every):
    if (name, k) in listed and not done(name, k) and (
        not recorded(name, k) or any(name in restores[d] and (d, k) in must_train
                                     for d in restores)):
      must_train.add((name, k))
  for name, k in every:
    model_dir = seed_dir(family_runs, name, k)
    if (name, k) in must_train and recorded(name, k):
      print(f"{family}/{name}" + (f" seed {k}" if k else "") + ": recorded in "
            f"{seed_dir(records, name, k)}, but an arm to train restores its checkpoint: "
            "training it again", flush=True)
    elif (name, k) not in must_train and recorded(name, k) and not os.path.exists(model_dir):
      restore_record(seed_dir(records, name, k), model_dir, family_runs)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
