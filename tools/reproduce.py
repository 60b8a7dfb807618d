"""Re-run a method family's reproduction with one command, and regenerate its README table and
plots.

    python tools/reproduce.py continual                 # every arm, then the table and plots
    python tools/reproduce.py continual --only replay_5  # one arm (and the table of all done)
    python tools/reproduce.py continual --quick          # every arm for a few steps (CI smoke)
    python tools/reproduce.py continual --no_train       # the table of the arms finished so far
    python tools/reproduce.py continual --jobs=4         # four arms side by side

A family is a folder experiments/FAMILY/ holding one small gin file per arm and manifest.json:

    {"title": "Continual pretraining",
     "compare_on": "tokens",                 # or "flops": what arms are compared at
     "bindings": ["DataConfig.seed = 0"],    # applied to every arm (e.g. one shared data order)
     "quick_bindings": ["Stage.num_steps = 3", ...],   # --quick: a few steps per arm
     "arms": [{"name": "baseline", "gin": "baseline.gin", "bindings": [], "seeds": 3}, ...],
     "plots": [{"name": "strong_shift", "arms": ["base", "replay_5"]}],   # optional groups
     "tables": [{"title": "Final loss", "metrics": ["eval/loss"],
                 "paper": "Ibrahim et al. 2024 (2403.08763), Table 1",
                 "compare": ["eval/loss"],   # optional: what "versus" rows are compared on
                 "rows": [{"arm": "baseline", "paper": {"eval/loss": 2.41}},
                          {"arm": "replay", "versus": "baseline"}, ...]}],
     "reports": [{"title": "Mixture law", "command": ["tools/fit_mixture_law.py", ...]}],
     "notes": "how to read the table; where our scale differs from the paper's",
     "headlines": [{"method": "Re-warm + 25% replay", "paper": "Ibrahim et al. 2024 (2403.08763)",
                    "gin": "experiments/continual/continue.gin", "arm": "replay",
                    "versus": "baseline", "metric": "eval/loss", "what": "old-domain loss",
                    "paper_result": "+0.07 against the union"}]}

The headlines are the family's rows in the methods table of the repository's README (between
its markers): the measured cell is the arm's mean ± std, or its difference from "versus"
(a tie where inside the spread), regenerated with the family's own table; each family keeps
its rows in experiments/FAMILY/headlines.json, so regenerating one family redraws the table
from every family's last results.

An arm may be {"name": ..., "command": ["tools/score_documents.py", ...]} instead: a python
script run once (data for later arms, written under {model_dir}). In bindings and commands,
{runs} is the folder holding every arm's MODEL_DIR (so an arm
can restore from an earlier one: "BASE_RUN = '{runs}/base'") and, in commands, {plots} the
plots folder. A report is a python script run after the arms; its output goes into the README
(a line naming a .png it wrote becomes the image).

Seeds: an arm runs `seeds` times (default 1; `--seeds=N` sets every arm's), seed k with
`run.seed = k` and `DataConfig.seed = k` (model initialisation and data order; every arm's seed k
reads the same rows); an arm's own binding of either wins, and may write {seed} for k (the
stability gap's reference model reads "DataConfig.seed = 1{seed}": an order no arm reads). Seed 0 lives in RUNS/ARM, seed k > 0 in RUNS/seed{k}/ARM, where {runs}
stands for RUNS/seed{k}: an arm's seed k restores seed k of the arm it names. A table cell over
several seeds is "mean ± standard deviation (n=K)"; a row with "versus": ARM gets a difference
column, written as a tie where the difference is smaller than the two arms' summed standard
deviations. In report commands {runs}/ARM stands for every finished seed of ARM, comma-separated
(the report tools read NAME=DIR,DIR,... as seeds). --quick runs one seed per arm, except the first
arm with several, which runs two: the multi-seed path is exercised too; it skips the arms marked
"quick": false, whose code path another arm already runs with other numbers (lengths, ratios).

Each arm trains in its own MODEL_DIR under --runs_dir (default $JAXLM_RUNS_DIR or
~/jaxlm_runs; --quick uses FAMILY-quick there), through `python -m jaxlm.train`, so an arm
interrupted part-way resumes from its checkpoint, and a finished one (its done.json) is skipped.
Every finished run's record (done.json, metrics.jsonl, config.gin, restore_report.json: what the
tables, plots and reports read; jaxlm/reports/run_records.py) is copied, as soon as it finishes,
into experiments/FAMILY/runs/, to be committed: on another machine (a fresh clone, a new
session) a recorded run counts as finished, so a reproduction longer than one machine's life
goes on where it stopped, and --no_train regenerates the README from the records alone. A
record has no checkpoint: an arm still to train that restores a recorded one trains that one
again first.
After the runs, the table (ours beside the paper's number, and the compute each arm used) goes
into experiments/FAMILY/README.md between the markers below, and the plots (tools/plot_runs.py,
against the manifest's compute axis) into experiments/FAMILY/plots/. With --quick both go to
the runs folder instead, leaving the README's measured table alone.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

from jaxlm.reports import plots as report_plots
from jaxlm.reports import run_records
from jaxlm.reports.run_records import seed_dir
from jaxlm.reports.runs import ReportError, branch_offset
# The markdown side (tables, ties, the README's methods table) lives in jaxlm/reports/tables.py;
# its markers and cells stay reachable here for the tool's callers.
from jaxlm.reports.tables import (BEGIN, COMPARE_ON, END, METHODS_BEGIN, METHODS_END,
                                  WITH_SOURCES, difference_cell, families, headline_rows,
                                  results_markdown, spread, write_between_markers,
                                  write_methods_table)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE_FIELDS = ("method", "paper", "gin", "arm", "metric", "what", "paper_result")


class ReproduceError(ValueError):
  """Bad input: one line on stderr, exit 2."""


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  gin: str | None  # None: a command arm.
  bindings: tuple[str, ...] = ()
  # Instead of training: a python script run once, e.g. scoring data for later arms; {runs}
  # and {model_dir} in it are replaced.
  command: tuple[str, ...] = ()
  seeds: int = 1
  quick: bool = True  # False: --quick skips it (its code path is another arm's, other numbers).


@dataclasses.dataclass(frozen=True)
class Manifest:
  family: str
  folder: str
  title: str
  compare_on: str
  arms: tuple[Arm, ...]
  tables: tuple[dict, ...]
  bindings: tuple[str, ...] = ()
  quick_bindings: tuple[str, ...] = ()
  notes: str = ""
  plots: tuple[dict, ...] = ()  # {"name", "arms"}: one set of figures per group of arms.
  reports: tuple[dict, ...] = ()  # {"title", "command"}: scripts run after the arms.
  headlines: tuple[dict, ...] = ()  # The family's rows in the README's methods table.


def load_manifest(experiments_dir: str, family: str) -> Manifest:
  folder = os.path.join(experiments_dir, family)
  path = os.path.join(folder, "manifest.json")
  if not os.path.isfile(path):
    known = families(experiments_dir) if os.path.isdir(experiments_dir) else []
    raise ReproduceError(f"unknown family {family!r}: no {path}; families: {known or 'none yet'}")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    arms = tuple(Arm(a["name"], a.get("gin"), tuple(a.get("bindings", ())),
                     tuple(a.get("command", ())), int(a.get("seeds", 1)),
                     bool(a.get("quick", True))) for a in raw["arms"])
    manifest = Manifest(family, folder, raw.get("title", family), raw.get("compare_on", "tokens"),
                        arms, tuple(raw.get("tables", ())), tuple(raw.get("bindings", ())),
                        tuple(raw.get("quick_bindings", ())), raw.get("notes", ""),
                        tuple(raw.get("plots", ())), tuple(raw.get("reports", ())),
                        tuple(raw.get("headlines", ())))
  except (ValueError, KeyError, TypeError) as e:
    raise ReproduceError(f"{path} is not a valid manifest ({type(e).__name__}: {e})") from None
  if manifest.compare_on not in COMPARE_ON:
    raise ReproduceError(f"{path}: compare_on must be one of {sorted(COMPARE_ON)}, got "
                         f"{manifest.compare_on!r}")
  names = [a.name for a in arms]
  for table in manifest.tables:
    for row in table.get("rows", ()):
      if row.get("arm") not in names:
        raise ReproduceError(f"{path}: table {table.get('title')!r} names arm {row.get('arm')!r}, "
                             f"which is not among the arms {names}")
  for headline in manifest.headlines:
    missing = [f for f in HEADLINE_FIELDS if f not in headline]
    if missing:
      raise ReproduceError(f"{path}: headline {headline.get('method')!r} lacks {missing}")
    for name in (headline["arm"], headline.get("versus", headline["arm"])):
      if name not in names:
        raise ReproduceError(f"{path}: headline {headline['method']!r} names arm {name!r}, "
                             f"which is not among the arms {names}")
  for group in manifest.plots:
    for name in group.get("arms", ()):
      if name not in names:
        raise ReproduceError(f"{path}: plot group {group.get('name')!r} names arm {name!r}, "
                             f"which is not among the arms {names}")
  for table in manifest.tables:
    metrics = table.get("metrics", [])
    for row in table.get("rows", ()):
      unknown = sorted(set(row.get("paper", {})) - set(metrics))
      if unknown:  # A paper number under another key would never be shown.
        raise ReproduceError(f"{path}: table {table.get('title')!r}, row {row['arm']!r}: paper "
                             f"number for {unknown[0]!r}, which is not among the table's "
                             f"metrics {metrics}")
      if row.get("versus", row["arm"]) not in names:
        raise ReproduceError(f"{path}: table {table.get('title')!r} compares {row['arm']!r} with "
                             f"{row['versus']!r}, which is not among the arms {names}")
  for arm in arms:
    quick = {a.name: a.quick for a in arms}
    skipped = [n for n in restored_arms(arm, names) if not quick[n]]
    if arm.quick and skipped:
      raise ReproduceError(f"{path}: arm {arm.name!r} restores {skipped[0]!r}, which --quick "
                           "skips (\"quick\": false); let --quick run both or neither")
    if arm.seeds < 1:
      raise ReproduceError(f"{path}: arm {arm.name!r} has seeds={arm.seeds}; give 1 or more")
    if (arm.gin is None) == (not arm.command):
      raise ReproduceError(f"{path}: arm {arm.name!r} needs exactly one of 'gin' and 'command'")
    if arm.gin is not None and not os.path.isfile(os.path.join(folder, arm.gin)):
      raise ReproduceError(f"{path}: arm {arm.name!r} names {arm.gin!r}, which is not in {folder}")
  return manifest


def seed_counts(manifest: Manifest, seeds: int | None, quick: bool) -> dict[str, int]:
  """How many seeds each arm runs: the manifest's, or --seeds for all; --quick: one, except the
  first arm with several (that restores no other arm), which runs two. An arm never runs more
  seeds than an arm it restores (restored_arms)."""
  counts = {a.name: (seeds or a.seeds) for a in manifest.arms}
  if quick:  # The first such arm that restores no other (whose seeds would be needed too).
    first = next((a.name for a in manifest.arms
                  if counts[a.name] > 1 and not restored_arms(a, counts)), None)
    counts = {name: 2 if name == first else 1 for name in counts}
  for arm in manifest.arms:
    for used in restored_arms(arm, counts):
      if counts[used] < counts[arm.name]:
        raise ReproduceError(f"arm {arm.name!r} runs {counts[arm.name]} seeds but restores arm "
                             f"{used!r}, which runs {counts[used]}; give {used!r} as many seeds")
  return counts


def restored_arms(arm: Arm, arms) -> list[str]:
  """The arms (among `arms`) whose runs `arm` restores: {runs}/NAME in its bindings or command."""
  return _arms_named(" ".join((*arm.bindings, *arm.command)), arms)


def _arms_named(text: str, arms) -> list[str]:
  return [name for name in re.findall(r"\{runs\}/([A-Za-z0-9_.-]+)", text) if name in arms]


def final_metrics(model_dir: str) -> dict[str, float]:
  """The last logged value of every metric of a run."""
  metrics = {}
  path = os.path.join(model_dir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          metrics.update(json.loads(line))
        except ValueError:
          continue  # A line cut by a kill.
  return metrics


def with_restored_compute(metrics: dict[str, float], model_dir: str, compare_on: str) -> dict:
  """`metrics` with WITH_SOURCES: its own compute plus, if it restored another run, that run's
  compute at the step it restored (and so on up the chain)."""
  own = metrics.get(COMPARE_ON[compare_on])
  if own is None:
    return metrics
  return {**metrics, WITH_SOURCES: own + branch_offset(model_dir, compare_on)}


def run_arm(manifest: Manifest, arm: Arm, model_dir: str, quick: bool, index: int,
            count: int, seed: int = 0, progress: bool = True,
            record_dir: str | None = None) -> dict[str, float]:
  """Trains (or resumes) one seed of an arm; returns its final metrics. A finished one is not
  re-run. `progress`: a live step counter (off when arms run side by side); `record_dir`: where
  its record goes as soon as it finishes (run_records), so a kill loses no finished run."""
  done = os.path.join(model_dir, "done.json")
  label = f"[{index}/{count}] {manifest.family}/{arm.name}" + (f" seed {seed}" if seed else "")
  if os.path.exists(done):
    print(f"{label}: done already ({model_dir})", flush=True)
    with open(done, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(model_dir, exist_ok=True)
  runs = os.path.dirname(model_dir)
  if arm.command:
    return _run_command_arm(arm, model_dir, runs, label, done)
  command = [sys.executable, "-m", "jaxlm.train",
             *arm_flags(manifest, arm, model_dir, quick, seed)]
  start = time.time()
  with open(os.path.join(model_dir, "train.log"), "a", encoding="utf-8") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if not progress:
      print(f"{label}: started", flush=True)
    while process.poll() is None:
      time.sleep(2)
      if progress:
        step = final_metrics(model_dir).get("step", 0)
        print(f"\r{label}: step {step}, {time.time() - start:.0f} s", end="", flush=True)
  print(f"\r{label}: exit {process.returncode} after {time.time() - start:.0f} s", flush=True)
  if process.returncode != 0:
    raise ReproduceError(f"arm {arm.name!r} failed (exit {process.returncode}); see "
                         f"{os.path.join(model_dir, 'train.log')}; run the same command to resume")
  metrics = {**final_metrics(model_dir), "reproduce/wall_seconds": time.time() - start}
  with open(done, "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  if record_dir is not None:
    family_runs = os.path.dirname(runs) if seed else runs
    run_records.save_record(model_dir, record_dir, family_runs)
  return metrics


def run_jobs(manifest: Manifest, jobs: list, family_runs: str, quick: bool,
             parallel: int = 1, records: str | None = None) -> None:
  """Runs the (arm, seed) jobs in order; with `parallel` > 1, that many side by side, each
  starting once the arms it restores ({runs}/NAME, same seed) have finished. Jobs are listed
  after the arms they restore, so a started job never waits on one that has not started.
  `records`: the family's records folder, where each finished training run's record goes."""
  def run(index, arm, seed, wait_for=()):
    for job in wait_for:
      job.result()  # Raises if that arm failed: this one does not start.
    return run_arm(manifest, arm, seed_dir(family_runs, arm.name, seed), quick, index,
                   len(jobs), seed, progress=parallel == 1,
                   record_dir=seed_dir(records, arm.name, seed) if records else None)
  if parallel == 1:
    for i, (arm, seed) in enumerate(jobs, 1):
      run(i, arm, seed)
    return
  names = [a.name for a in manifest.arms]
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    started = {}
    for i, (arm, seed) in enumerate(jobs, 1):
      restored = restored_arms(arm, names)
      started[arm.name, seed] = pool.submit(
          run, i, arm, seed, [started[r, seed] for r in restored if (r, seed) in started])
    for job in started.values():
      job.result()


def restore_records(manifest: Manifest, counts: dict[str, int], jobs: list, family_runs: str,
                    records: str) -> None:
  """Puts back the repository's records of the arms not finished under family_runs, except
  those a job still to train restores (run_records.put_back)."""
  names = [a.name for a in manifest.arms]
  run_records.put_back(
      [(a.name, k) for k in range(max(counts.values())) for a in manifest.arms
       if k < counts[a.name]],
      {(arm.name, k) for arm, k in jobs}, {a.name: restored_arms(a, names) for a in manifest.arms},
      family_runs, records, manifest.family)


def arm_flags(manifest: Manifest, arm: Arm, model_dir: str, quick: bool,
              seed: int = 0) -> list[str]:
  """jaxlm.train's flags for a training arm. The family's shared bindings (and --quick's) are
  defaults that some arms do not use (--gin_defaults: a warning); the arm's own must be used.
  Seed k > 0 sets the model's initialisation and the data order (seed 0 keeps the manifest's)."""
  runs = os.path.dirname(model_dir)
  # The seed's bindings come first, so an arm that sets its own (with {seed} in it) wins.
  own = [*([f"run.seed = {seed}", f"DataConfig.seed = {seed}"] if seed else []),
         *(b.replace("{seed}", str(seed)) for b in arm.bindings),
         f"MODEL_DIR = '{model_dir}'", "TrainerConfig.progress = 'log'"]
  return [f"--gin_file={os.path.join(manifest.folder, arm.gin)}",
          *[f"--gin_defaults={b.replace('{runs}', runs)}" for b in manifest.bindings],
          *[f"--gin_bindings={b.replace('{runs}', runs)}" for b in own],
          *[f"--gin_defaults={b}" for b in (manifest.quick_bindings if quick else ())]]


def _run_command_arm(arm: Arm, model_dir: str, runs: str, label: str, done: str) -> dict:
  command = [c.replace("{runs}", runs).replace("{model_dir}", model_dir) for c in arm.command]
  start = time.time()
  with open(os.path.join(model_dir, "command.log"), "a", encoding="utf-8") as log:
    code = subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT,
                          cwd=REPO, check=False).returncode
  print(f"{label}: exit {code} after {time.time() - start:.0f} s", flush=True)
  if code != 0:
    raise ReproduceError(f"arm {arm.name!r} failed (exit {code}); see "
                         f"{os.path.join(model_dir, 'command.log')}")
  with open(done, "w", encoding="utf-8") as f:
    json.dump({}, f)
  return {}


def run_report(report: dict, runs: str, plots_dir: str,
               seeds: dict[str, list[str]] | None = None) -> tuple[str, list[str]]:
  """(the report's text output, the PNG files it names) -- or its error as the text.
  `seeds`: {arm: its finished seeds' dirs}, which {runs}/ARM stands for."""
  seeds = seeds or {}

  def expand(text: str) -> str:
    text = re.sub(r"\{runs\}/([A-Za-z0-9_.-]+)",
                  lambda m: ",".join(seeds[m.group(1)]) if seeds.get(m.group(1)) else m.group(0),
                  text)
    return text.replace("{runs}", runs).replace("{plots}", plots_dir)

  command = [expand(c) for c in report["command"]]
  done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"Not available: {error}", []
  lines = done.stdout.rstrip().splitlines()
  images = [line for line in lines if line.endswith(".png") and os.path.exists(line)]
  # Runs named relative to the family's runs folder: the README reads the same on any machine.
  text = "\n".join(line for line in lines if line not in images)
  return text.replace(os.path.abspath(runs) + os.sep, ""), images


def wall_seconds(finished: dict[str, list[str]]) -> float | None:
  """The training arms' summed time over all their seeds (done.json), None unless every one
  recorded it."""
  total = 0.0
  for run_dir in (d for dirs in finished.values() for d in dirs):
    try:
      with open(os.path.join(run_dir, "done.json"), encoding="utf-8") as f:
        total += float(json.load(f)["reproduce/wall_seconds"])
    except (OSError, ValueError, KeyError):
      return None
  return total


def reproduce(family: str, quick: bool = False, only: str | None = None,
              runs_dir: str | None = None, experiments_dir: str | None = None,
              seeds: int | None = None, train: bool = True, parallel: int = 1) -> str:
  """Runs the family's arms (all, or `only`), each over its seeds, then writes its table and
  plots; returns the markdown written."""
  experiments_dir = experiments_dir or os.path.join(REPO, "experiments")
  manifest = load_manifest(experiments_dir, family)
  arms = manifest.arms
  if only is not None:
    arms = tuple(a for a in arms if a.name == only)
    if not arms:
      raise ReproduceError(f"family {family!r} has no arm {only!r}; arms: "
                           f"{[a.name for a in manifest.arms]}")
  if quick and only is None:
    arms = tuple(a for a in arms if a.quick)
  runs_dir = runs_dir or os.environ.get("JAXLM_RUNS_DIR") or os.path.expanduser("~/jaxlm_runs")
  family_runs = os.path.join(runs_dir, family + ("-quick" if quick else ""))
  counts = seed_counts(manifest, seeds, quick)
  # Seed by seed: every arm's seed 0 first (the single-seed table), then the further seeds.
  jobs = [(arm, k) for k in range(max(counts.values())) for arm in arms if k < counts[arm.name]]
  records = os.path.join(manifest.folder, "runs")
  if not quick:  # Finished runs recorded in the repository count as finished here.
    restore_records(manifest, counts, jobs if train else [], family_runs, records)
  run_jobs(manifest, jobs if train else [], family_runs, quick, parallel,  # --no_train: none.
           None if quick else records)
  finished = {}  # arm -> its finished seeds' MODEL_DIRs, in seed order.
  for arm in manifest.arms:
    dirs = [seed_dir(family_runs, arm.name, k) for k in range(counts[arm.name])]
    done = [d for d in dirs if os.path.exists(os.path.join(d, "done.json"))]
    if done:
      finished[arm.name] = done
  training_arms = {a.name for a in manifest.arms if a.gin}
  trained = {name: dirs for name, dirs in finished.items() if name in training_arms}
  if not quick:  # Runs finished before records existed, or under an older checkout, too.
    for name, dirs in trained.items():
      for d in dirs:
        run_records.save_record(d, os.path.join(records, os.path.relpath(d, family_runs)),
                                family_runs)
  results = {name: [with_restored_compute(final_metrics(d), d, manifest.compare_on)
                     for d in dirs] for name, dirs in trained.items()}
  out = family_runs if quick else manifest.folder
  plots = []
  for group in manifest.plots or ({"name": "", "arms": list(trained)},):
    members = {name: trained[name] for name in group["arms"] if name in trained}
    if members:
      plots += report_plots.plot_runs(members, os.path.join(out, "plots", group["name"]),
                                   x=manifest.compare_on, targets=group.get("targets"))
  reports = [(r["title"], *run_report(r, family_runs, os.path.join(out, "plots"), finished))
             for r in manifest.reports]
  report_images = {image for _, _, images in reports for image in images}
  report_plots.remove_stale_plots(os.path.join(out, "plots"), {*plots, *report_images})
  text = results_markdown(manifest, results, plots, out, reports, wall_seconds(trained))
  write_between_markers(os.path.join(out, "README.md"), text, manifest.title)
  if not quick and only is None:  # Only a whole family's results stand in the methods table.
    with open(os.path.join(manifest.folder, "headlines.json"), "w", encoding="utf-8") as f:
      json.dump(headline_rows(manifest, results), f, indent=1)
      f.write("\n")
    write_methods_table(os.path.join(experiments_dir, os.pardir, "README.md"), experiments_dir)
  return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/reproduce.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("family", help="a folder of experiments/ with a manifest.json")
  parser.add_argument("--quick", action="store_true", help="a few steps per arm (smoke test)")
  parser.add_argument("--only", default=None, help="run only this arm")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per arm (default: each arm's manifest 'seeds', else 1)")
  parser.add_argument("--runs_dir", default=None, help="where each arm's MODEL_DIR goes")
  parser.add_argument("--jobs", type=int, default=1,
                      help="arms trained side by side (each waits for the arms it restores); "
                           "their wall times then overlap")
  parser.add_argument("--no_train", action="store_true",
                      help="train nothing: the tables and plots of the arms finished so far")
  parser.add_argument("--experiments_dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.seeds is not None and args.seeds < 1:
      raise ReproduceError(f"--seeds={args.seeds}: give 1 or more")
    if args.jobs < 1:
      raise ReproduceError(f"--jobs={args.jobs}: give 1 or more")
    print(reproduce(args.family, args.quick, args.only, args.runs_dir, args.experiments_dir,
                    args.seeds, train=not args.no_train, parallel=args.jobs))
  except (ReproduceError, ReportError) as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
