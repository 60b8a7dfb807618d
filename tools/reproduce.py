"""Re-run a method family's reproduction with one command, and regenerate its README table and
plots.

    python tools/reproduce.py continual                 # every arm, then the table and plots
    python tools/reproduce.py continual --only replay_5  # one arm (and the table of all done)
    python tools/reproduce.py continual --quick          # every arm for a few steps (CI smoke)

A family is a folder experiments/FAMILY/ holding one small gin file per arm and manifest.json:

    {"title": "Continual pretraining",
     "compare_on": "tokens",                 # or "flops": what arms are compared at
     "bindings": ["DataConfig.seed = 0"],    # applied to every arm (e.g. one shared data order)
     "quick_bindings": ["Stage.num_steps = 3", ...],   # --quick: a few steps per arm
     "arms": [{"name": "baseline", "gin": "baseline.gin", "bindings": []}, ...],
     "plots": [{"name": "strong_shift", "arms": ["base", "replay_5"]}],   # optional groups
     "tables": [{"title": "Final loss", "metrics": ["eval/loss"],
                 "paper": "Ibrahim et al. 2024 (2403.08763), Table 1",
                 "rows": [{"arm": "baseline", "paper": {"eval/loss": 2.41}}, ...]}],
     "reports": [{"title": "Mixture law", "command": ["tools/fit_mixture_law.py", ...]}],
     "notes": "how to read the table; where our scale differs from the paper's"}

An arm may be {"name": ..., "command": ["tools/score_documents.py", ...]} instead: a python
script run once (data for later arms, written under {model_dir}). In bindings and commands,
{runs} is the folder holding every arm's MODEL_DIR (so an arm
can restore from an earlier one: "BASE_RUN = '{runs}/base'") and, in commands, {plots} the
plots folder. A report is a python script run after the arms; its output goes into the README
(a line naming a .png it wrote becomes the image).

Each arm trains in its own MODEL_DIR under --runs_dir (default $JAXLM_RUNS_DIR or
~/jaxlm_runs; --quick uses FAMILY-quick there), through `python -m jaxlm.train`, so an arm
interrupted part-way resumes from its checkpoint, and a finished one (its done.json) is skipped.
After the runs, the table (ours beside the paper's number, and the compute each arm used) goes
into experiments/FAMILY/README.md between the markers below, and the plots (tools/plot_runs.py,
against the manifest's compute axis) into experiments/FAMILY/plots/. With --quick both go to
the runs folder instead, leaving the README's measured table alone.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_runs  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
COMPARE_ON = {"tokens": "total/tokens", "flops": "total/flops"}


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


def families(experiments_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(experiments_dir)
                if os.path.isfile(os.path.join(experiments_dir, d, "manifest.json")))


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
                     tuple(a.get("command", ()))) for a in raw["arms"])
    manifest = Manifest(family, folder, raw.get("title", family), raw.get("compare_on", "tokens"),
                        arms, tuple(raw.get("tables", ())), tuple(raw.get("bindings", ())),
                        tuple(raw.get("quick_bindings", ())), raw.get("notes", ""),
                        tuple(raw.get("plots", ())), tuple(raw.get("reports", ())))
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
  for group in manifest.plots:
    for name in group.get("arms", ()):
      if name not in names:
        raise ReproduceError(f"{path}: plot group {group.get('name')!r} names arm {name!r}, "
                             f"which is not among the arms {names}")
  for arm in arms:
    if (arm.gin is None) == (not arm.command):
      raise ReproduceError(f"{path}: arm {arm.name!r} needs exactly one of 'gin' and 'command'")
    if arm.gin is not None and not os.path.isfile(os.path.join(folder, arm.gin)):
      raise ReproduceError(f"{path}: arm {arm.name!r} names {arm.gin!r}, which is not in {folder}")
  return manifest


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


def run_arm(manifest: Manifest, arm: Arm, model_dir: str, quick: bool, index: int,
            count: int) -> dict[str, float]:
  """Trains (or resumes) one arm; returns its final metrics. A finished arm is not re-run."""
  done = os.path.join(model_dir, "done.json")
  label = f"[{index}/{count}] {manifest.family}/{arm.name}"
  if os.path.exists(done):
    print(f"{label}: done already ({model_dir})", flush=True)
    with open(done, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(model_dir, exist_ok=True)
  runs = os.path.dirname(model_dir)
  if arm.command:
    return _run_command_arm(arm, model_dir, runs, label, done)
  bindings = [b.replace("{runs}", runs) for b in
              (*manifest.bindings, *arm.bindings, *(manifest.quick_bindings if quick else ()))]
  bindings += [f"MODEL_DIR = '{model_dir}'", "TrainerConfig.progress = 'log'"]
  command = [sys.executable, "-m", "jaxlm.train",
             f"--gin_file={os.path.join(manifest.folder, arm.gin)}",
             *[f"--gin_bindings={b}" for b in bindings]]
  start = time.time()
  with open(os.path.join(model_dir, "train.log"), "a", encoding="utf-8") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env=arm_env(runs))
    while process.poll() is None:
      time.sleep(2)
      step = final_metrics(model_dir).get("step", 0)
      print(f"\r{label}: step {step}, {time.time() - start:.0f} s", end="", flush=True)
  print(f"\r{label}: exit {process.returncode} after {time.time() - start:.0f} s", flush=True)
  if process.returncode != 0:
    raise ReproduceError(f"arm {arm.name!r} failed (exit {process.returncode}); see "
                         f"{os.path.join(model_dir, 'train.log')}; run the same command to resume")
  metrics = {**final_metrics(model_dir), "reproduce/wall_seconds": time.time() - start}
  with open(done, "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics


def arm_env(runs: str) -> dict[str, str]:
  """The arms' environment: one persistent XLA compilation cache for the family, so arms of the
  same shapes compile their steps once (unless JAX_COMPILATION_CACHE_DIR is set already)."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(runs, ".jax_cache"))
  return env


def _run_command_arm(arm: Arm, model_dir: str, runs: str, label: str, done: str) -> dict:
  command = [c.replace("{runs}", runs).replace("{model_dir}", model_dir) for c in arm.command]
  start = time.time()
  with open(os.path.join(model_dir, "command.log"), "a", encoding="utf-8") as log:
    code = subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT,
                          cwd=REPO, check=False, env=arm_env(runs)).returncode
  print(f"{label}: exit {code} after {time.time() - start:.0f} s", flush=True)
  if code != 0:
    raise ReproduceError(f"arm {arm.name!r} failed (exit {code}); see "
                         f"{os.path.join(model_dir, 'command.log')}")
  with open(done, "w", encoding="utf-8") as f:
    json.dump({}, f)
  return {}


def _cell(value) -> str:
  if value is None:
    return "–"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_report(report: dict, runs: str, plots_dir: str) -> tuple[str, list[str]]:
  """(the report's text output, the PNG files it names) -- or its error as the text."""
  command = [c.replace("{runs}", runs).replace("{plots}", plots_dir) for c in report["command"]]
  done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"Not available: {error}", []
  lines = done.stdout.rstrip().splitlines()
  images = [line for line in lines if line.endswith(".png") and os.path.exists(line)]
  return "\n".join(line for line in lines if line not in images), images


def wall_seconds(family_runs: str, arms) -> float | None:
  """The arms' summed training time (done.json), None unless every training arm recorded it."""
  total = 0.0
  for arm in (a for a in arms if a.gin):
    try:
      with open(os.path.join(family_runs, arm.name, "done.json"), encoding="utf-8") as f:
        total += float(json.load(f)["reproduce/wall_seconds"])
    except (OSError, ValueError, KeyError):
      return None
  return total


def results_markdown(manifest: Manifest, results: dict[str, dict], plots: list[str],
                     plots_relative_to: str, reports=(), seconds: float | None = None) -> str:
  """The tables (ours beside the paper's), the compute each arm used, and the plots."""
  compute = COMPARE_ON[manifest.compare_on]
  took = "" if seconds is None else f" The arms trained for {seconds / 60:.0f} minutes here."
  lines = [f"Compared at equal {manifest.compare_on} ({compute}); regenerated by "
           f"`python tools/reproduce.py {manifest.family}`.{took}", ""]
  for table in manifest.tables:
    metrics = table.get("metrics", [])
    lines += [f"**{table.get('title', 'Results')}** — paper: {table.get('paper', '–')}", ""]
    header = ["arm", compute] + [f"{m} (ours)" for m in metrics] + [f"{m} (paper)" for m in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.get("rows", []):
      ours = results.get(row["arm"], {})
      paper = row.get("paper", {})
      cells = ([row.get("label", row["arm"]), _cell(ours.get(compute))]
               + [_cell(ours.get(m)) for m in metrics] + [_cell(paper.get(m)) for m in metrics])
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  for title, text, images in reports:
    lines += [f"**{title}**", "", text, ""]
    lines += [f"![{title}]({os.path.relpath(p, plots_relative_to)})" for p in images] + [""]
  if manifest.notes:
    lines += [manifest.notes, ""]
  for path in plots:
    name = os.path.relpath(os.path.splitext(path)[0], os.path.join(plots_relative_to, "plots"))
    name = name.replace("_", " ").replace(os.sep, ": ")  # "strong shift: eval loss"
    lines.append(f"![{name}]({os.path.relpath(path, plots_relative_to)})")
  return "\n".join(lines).rstrip() + "\n"


def write_between_markers(readme: str, text: str, title: str) -> None:
  """Replaces what lies between the markers (the rest of the README is the author's)."""
  if os.path.exists(readme):
    with open(readme, encoding="utf-8") as f:
      current = f.read()
  else:
    current = f"# {title}\n\n{BEGIN}\n{END}\n"
  if BEGIN not in current or END not in current:
    current = current.rstrip() + f"\n\n{BEGIN}\n{END}\n"
  head, rest = current.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(readme + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{text}{END}{tail}")
  os.replace(readme + ".tmp", readme)


def reproduce(family: str, quick: bool = False, only: str | None = None,
              runs_dir: str | None = None, experiments_dir: str | None = None) -> str:
  """Runs the family's arms (all, or `only`), then writes its table and plots; returns the
  markdown written."""
  experiments_dir = experiments_dir or os.path.join(REPO, "experiments")
  manifest = load_manifest(experiments_dir, family)
  arms = manifest.arms
  if only is not None:
    arms = tuple(a for a in arms if a.name == only)
    if not arms:
      raise ReproduceError(f"family {family!r} has no arm {only!r}; arms: "
                           f"{[a.name for a in manifest.arms]}")
  runs_dir = runs_dir or os.environ.get("JAXLM_RUNS_DIR") or os.path.expanduser("~/jaxlm_runs")
  family_runs = os.path.join(runs_dir, family + ("-quick" if quick else ""))
  for i, arm in enumerate(arms, 1):
    run_arm(manifest, arm, os.path.join(family_runs, arm.name), quick, i, len(arms))
  finished = {a.name: os.path.join(family_runs, a.name) for a in manifest.arms
              if a.gin and os.path.exists(os.path.join(family_runs, a.name, "done.json"))}
  results = {name: final_metrics(path) for name, path in finished.items()}
  out = family_runs if quick else manifest.folder
  plots = []
  for group in manifest.plots or ({"name": "", "arms": list(finished)},):
    members = [name for name in group["arms"] if name in finished]
    if members:
      plots += plot_runs.plot_runs([finished[n] for n in members],
                                   os.path.join(out, "plots", group["name"]),
                                   x=manifest.compare_on, names=members)
  reports = [(r["title"], *run_report(r, family_runs, os.path.join(out, "plots")))
             for r in manifest.reports]
  text = results_markdown(manifest, results, plots, out, reports,
                         wall_seconds(family_runs, manifest.arms))
  write_between_markers(os.path.join(out, "README.md"), text, manifest.title)
  return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/reproduce.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("family", help="a folder of experiments/ with a manifest.json")
  parser.add_argument("--quick", action="store_true", help="a few steps per arm (smoke test)")
  parser.add_argument("--only", default=None, help="run only this arm")
  parser.add_argument("--runs_dir", default=None, help="where each arm's MODEL_DIR goes")
  parser.add_argument("--experiments_dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    print(reproduce(args.family, args.quick, args.only, args.runs_dir, args.experiments_dir))
  except (ReproduceError, plot_runs.PlotError) as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
