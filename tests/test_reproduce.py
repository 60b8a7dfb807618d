"""tools/reproduce.py: a family's arms run (resumably), their table (ours beside the paper's)
and plots are regenerated; every family in experiments/ passes its --quick smoke run."""

import json
import os
import shutil
import time

import pytest

from jaxlm.data.sources import shared_corpora_dir
from conftest import REPO_ROOT, load_tool

reproduce = load_tool("reproduce")

ARM_GIN = "include 'experiments/quickstart.gin'\nwarmup_cosine.peak_lr = {lr}\n"


def _family(root, corpus):
  folder = root / "experiments" / "toy"
  folder.mkdir(parents=True)
  for name, lr in (("low", 1e-3), ("high", 3e-3)):
    (folder / f"{name}.gin").write_text(ARM_GIN.format(lr=lr), encoding="utf-8")
  manifest = {
      "title": "Toy family", "compare_on": "tokens",
      "bindings": ["DataConfig.source = @text_files", f"text_files.paths = '{corpus}'",
                   "DataConfig.seq_len = 64", "DataConfig.batch_size = 4",
                   "DataConfig.max_eval_batches = 2", "TrainerConfig.sample_tokens = 0",
                   "warmup_cosine.warmup_steps = 1"],
      "quick_bindings": ["Stage.num_steps = 3", "EvalConfig.every = 3"],
      # A command arm runs a script once (data for later arms) instead of training.
      "arms": [{"name": "note", "command": [
                   "-c", "import sys; open(sys.argv[1] + '/note.txt', 'w').write('made')",
                   "{model_dir}"]},
               {"name": "low", "gin": "low.gin"},
               # The same code path with other numbers: --quick skips it.
               {"name": "lower", "gin": "low.gin", "bindings": ["warmup_cosine.peak_lr = 5e-4"],
                "quick": False},
               {"name": "high", "gin": "high.gin", "seeds": 2}],
      "tables": [{"title": "Final loss", "metrics": ["eval/loss"], "paper": "Nobody 2099, Fig. 1",
                  "rows": [{"arm": "low", "paper": {"eval/loss": 9.5}},
                           {"arm": "high", "label": "high LR", "paper": {"eval/loss": 9.25},
                            "versus": "low"}]}],
      # A report after the arms: a script whose output (here: where the runs are) is quoted.
      "reports": [{"title": "Where the runs are",
                   "command": ["-c", "import os, sys; print(sorted(f for f in os.listdir(sys.argv[1])"
                                     " if not f.startswith('.')))",
                               "{runs}"]}],
      "notes": "A toy: nothing to reproduce.",
      "headlines": [{"method": "High LR", "paper": "Nobody 2099", "gin": "experiments/toy/high.gin",
                     "arm": "high", "versus": "low", "metric": "eval/loss",
                     "what": "final loss", "paper_result": "-1"}]}
  (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
  (folder / "README.md").write_text(f"# Toy\n\nOur words.\n\n{reproduce.BEGIN}\nold\n"
                                    f"{reproduce.END}\n\nMore words.\n", encoding="utf-8")
  return root / "experiments"


@pytest.mark.slow  # Three runs of the runner, a minute; .ci/run runs the slow tests.
def test_a_family_runs_resumably_and_its_table_and_plots_are_regenerated(
    tmp_path, small_text_file, capsys):
  experiments = _family(tmp_path, small_text_file)
  runs = tmp_path / "runs"
  common = [f"--runs_dir={runs}", f"--experiments_dir={experiments}"]
  # --quick: a few steps per arm, and the table beside the runs (the README stays as it was).
  assert reproduce.main(["toy", "--quick", "--only=low", *common]) == 0
  assert (runs / "toy-quick" / "low" / "done.json").exists()
  assert not (runs / "toy-quick" / "high").exists()
  assert "old" in (experiments / "toy" / "README.md").read_text()
  assert reproduce.BEGIN in (runs / "toy-quick" / "README.md").read_text()
  # Every arm: "low" was killed after its last save (no done.json) and resumes from it.
  os.remove(runs / "toy-quick" / "low" / "done.json")
  assert reproduce.main(["toy", "--quick", *common]) == 0
  assert "resuming from step 3" in (runs / "toy-quick" / "low" / "train.log").read_text()
  # A third time nothing trains: every arm is done.
  capsys.readouterr()
  assert reproduce.main(["toy", "--quick", *common]) == 0
  out = capsys.readouterr().out
  assert "toy/low: done already" in out and "toy/high: done already" in out
  readme = (runs / "toy-quick" / "README.md").read_text()
  low = reproduce.final_metrics(str(runs / "toy-quick" / "low"))
  assert low["step"] == 3
  assert f"| low | {low['total/tokens']:.4g} | {low['eval/loss']:.4g} |  | 9.5 |" in readme, readme
  # --quick runs the multi-seed path once: "high" (seeds: 2) runs seed 1 too, with its own
  # initialisation and data order, and its cell is the mean and spread of both.
  seed1 = runs / "toy-quick" / "seed1" / "high"
  assert (seed1 / "done.json").exists()
  assert "run.seed = 1" in (seed1 / "config.gin").read_text()
  highs = [reproduce.final_metrics(str(d))["eval/loss"] for d in (runs / "toy-quick" / "high", seed1)]
  assert highs[0] != highs[1]
  mean, std = reproduce.spread(highs)
  assert f"| high LR | {low['total/tokens']:.4g} | {mean:.4g} ± {std:.2g} (n=2) | " in readme
  assert "Nobody 2099, Fig. 1" in readme and "A toy: nothing to reproduce." in readme
  assert "![train loss](plots/train_loss.png)" in readme
  assert "**Where the runs are**\n\n['README.md', 'high', 'low', 'note', 'plots', 'seed1']" in readme
  assert (runs / "toy-quick" / "note" / "note.txt").read_text() == "made"
  assert not (runs / "toy-quick" / "lower").exists()
  assert (runs / "toy-quick" / "plots" / "eval_loss.png").stat().st_size > 1000


def test_the_table_goes_between_the_markers_of_the_family_readme(tmp_path, small_text_file):
  """Without --quick the family's README is rewritten between its markers only (arms already
  done are read, not re-run; --no_train runs none of the others)."""
  experiments = _family(tmp_path, small_text_file)
  runs = tmp_path / "runs" / "toy"
  # As if both arms had finished two seeds each (--seeds=2).
  for arm, seed, loss in (("low", 0, 5.0), ("low", 1, 5.1), ("high", 0, 4.0), ("high", 1, 4.2),
                          ("lower", 0, 5.5), ("lower", 1, 5.6)):
    run = runs / (f"seed{seed}" if seed else "") / arm
    run.mkdir(parents=True)
    record = {"step": 3, "eval/loss": loss, "total/tokens": 768.0, "train/loss": loss}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run / "done.json").write_text(json.dumps(record))
  stale = experiments / "toy" / "plots" / "gone" / "forgetting.png"  # A figure no longer drawn.
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b"png")
  top = tmp_path / "README.md"  # The repository's README, with the methods table's markers.
  top.write_text(f"# Top\n\n{reproduce.METHODS_BEGIN}\nold rows\n{reproduce.METHODS_END}\n")
  assert reproduce.main(["toy", "--seeds=2", f"--runs_dir={tmp_path / 'runs'}",
                         f"--experiments_dir={experiments}", "--no_train"]) == 0
  assert not (runs / "note").exists()  # --no_train: no arm ran, not even the command arm.
  # The family's headline row, measured, in the README's methods table.
  assert ("| toy | High LR | Nobody 2099 | `experiments/toy/high.gin` | final loss: -0.95 "
          "| -1 |") in top.read_text()
  assert "old rows" not in top.read_text()
  readme = (experiments / "toy" / "README.md").read_text()
  assert readme.startswith("# Toy\n\nOur words.") and readme.endswith("More words.\n")
  assert "old" not in readme
  assert "| low | 768 | 5.05 ± 0.071 (n=2) |  | 9.5 |" in readme, readme
  assert "| high LR | 768 | 4.1 ± 0.14 (n=2) | -0.95 vs low | 9.25 |" in readme, readme
  assert (experiments / "toy" / "plots" / "train_loss.png").exists()
  assert not stale.exists()


def test_a_difference_inside_the_spread_is_a_tie():
  assert reproduce.difference_cell([2.00, 2.02], [2.01, 2.03]) == "tie (-0.01, spread 0.028)"
  assert reproduce.difference_cell([2.00, 2.02], [2.10, 2.12]) == "-0.1"
  assert reproduce.difference_cell([2.0], [2.1, 2.2]) == "-0.15 (n=1: no spread)"


def test_an_arm_cannot_run_more_seeds_than_the_arm_it_restores():
  manifest = reproduce.Manifest("f", "/x", "F", "tokens", (
      reproduce.Arm("base", "base.gin", seeds=1),
      reproduce.Arm("more", "more.gin", ("BASE_RUN = '{runs}/base'",), seeds=3)), ())
  with pytest.raises(reproduce.ReproduceError, match="'more' runs 3 seeds but restores arm "
                                                     "'base', which runs 1"):
    reproduce.seed_counts(manifest, None, quick=False)
  assert reproduce.seed_counts(manifest, 2, quick=False) == {"base": 2, "more": 2}
  # --quick: one seed each, except the first arm with several that restores no other.
  assert reproduce.seed_counts(manifest, None, quick=True) == {"base": 1, "more": 1}


def test_arms_side_by_side_start_after_the_arms_they_restore(monkeypatch):
  manifest = reproduce.Manifest("f", "/x", "F", "tokens", (
      reproduce.Arm("base", "b.gin"), reproduce.Arm("other", "o.gin"),
      reproduce.Arm("branch", "c.gin", ("BASE_RUN = '{runs}/base'",))), ())
  events = []

  def fake_run_arm(manifest, arm, model_dir, quick, index, count, seed=0, progress=True,
                   record_dir=None):
    assert not progress  # No live counters from two arms at once.
    events.append(("start", arm.name))
    time.sleep(0.3 if arm.name == "base" else 0.05)
    events.append(("end", arm.name))
    return {}
  monkeypatch.setattr(reproduce, "run_arm", fake_run_arm)
  reproduce.run_jobs(manifest, [(a, 0) for a in manifest.arms], "/runs", False, parallel=2)
  assert events.index(("end", "base")) < events.index(("start", "branch"))
  assert events.index(("start", "other")) < events.index(("end", "base"))  # Side by side.


def test_an_arms_binding_of_its_seed_wins_and_reads_seed_k():
  manifest = reproduce.Manifest("f", "/x", "F", "tokens", (), ())
  arm = reproduce.Arm("reference", "ref.gin", ("DataConfig.seed = 1{seed}",))
  flags = reproduce.arm_flags(manifest, arm, "/runs/seed2/reference", quick=False, seed=2)
  bindings = [f.split("=", 1)[1] for f in flags if f.startswith("--gin_bindings=")]
  # gin keeps the last binding: the arm's own, with {seed} read as 2.
  assert [b for b in bindings if b.startswith("DataConfig.seed")] == [
      "DataConfig.seed = 2", "DataConfig.seed = 12"]
  assert "DataConfig.seed = 10" in reproduce.arm_flags(manifest, arm, "/runs/reference",
                                                       quick=False)[1].split("=", 1)[1]


def test_finished_runs_are_recorded_in_the_repository_and_count_as_finished_elsewhere(
    tmp_path, small_text_file, capsys):
  """A run's record (what the tables read) goes into experiments/FAMILY/runs/ with the runs
  folder's path made portable; on another machine it is put back as a finished run, except
  where an arm still to train restores it (a record has no checkpoint)."""
  experiments = _family(tmp_path, small_text_file)
  first = tmp_path / "machine1"
  for arm, seed, loss in (("low", 0, 5.0), ("high", 0, 4.0), ("high", 1, 4.2)):
    run = first / "toy" / (f"seed{seed}" if seed else "") / arm
    _write_run(run, [{"step": 3, "eval/loss": loss, "total/tokens": 768.0}],
               f"MODEL_DIR = '{run}'\n")
    (run / "done.json").write_text(json.dumps({"eval/loss": loss}))
    (run / "restore_report.json").write_text(json.dumps({"source": str(first / "toy" / "x")}))
  (first / "toy" / "low" / "checkpoints").mkdir()  # Not part of the record.
  common = [f"--experiments_dir={experiments}", "--no_train"]
  assert reproduce.main(["toy", f"--runs_dir={first}", *common]) == 0
  table = (experiments / "toy" / "README.md").read_text()
  record = experiments / "toy" / "runs" / "seed1" / "high"
  assert sorted(os.listdir(record)) == ["config.gin", "done.json", "metrics.jsonl",
                                        "restore_report.json"]
  assert sorted(os.listdir(experiments / "toy" / "runs" / "low")) == sorted(os.listdir(record))
  assert json.loads((record / "restore_report.json").read_text())["source"] == "{family_runs}/x"
  # A fresh machine, with nothing but the repository: the same table, from the records.
  second = tmp_path / "machine2"
  assert reproduce.main(["toy", f"--runs_dir={second}", *common]) == 0
  assert (experiments / "toy" / "README.md").read_text() == table
  put_back = second / "toy" / "seed1" / "high"
  assert json.loads((put_back / "restore_report.json").read_text())["source"] == str(
      second / "toy" / "x")
  assert f"MODEL_DIR = '{put_back}'" in (put_back / "config.gin").read_text()
  # An arm still to train ("lower", no record) restores "low": low trains again, high does not.
  manifest = reproduce.load_manifest(str(experiments), "toy")
  arms = [a if a.name != "lower" else reproduce.dataclasses.replace(
      a, bindings=("BASE_RUN = '{runs}/low'",)) for a in manifest.arms]
  manifest = reproduce.dataclasses.replace(manifest, arms=tuple(arms))
  counts = reproduce.seed_counts(manifest, None, False)
  jobs = [(a, k) for k in range(2) for a in manifest.arms if k < counts[a.name]]
  third = tmp_path / "machine3" / "toy"
  capsys.readouterr()
  reproduce.restore_records(manifest, counts, jobs, str(third),
                            str(experiments / "toy" / "runs"))
  assert not (third / "low").exists() and not (third / "lower").exists()
  assert (third / "high" / "done.json").exists() and (third / "seed1" / "high" / "done.json").exists()
  assert "toy/low: recorded in" in capsys.readouterr().out


def test_a_run_is_recorded_as_soon_as_it_finishes(tmp_path, small_text_file, monkeypatch):
  """Seed 1 of an arm: its record lands in the family's runs/seed1/ARM when the arm exits, before
  the other arms run (a kill later loses nothing finished)."""
  experiments = _family(tmp_path, small_text_file)
  manifest = reproduce.load_manifest(str(experiments), "toy")
  family_runs = tmp_path / "runs" / "toy"
  model_dir = family_runs / "seed1" / "high"
  _write_run(model_dir, [{"step": 3, "eval/loss": 4.0}], f"MODEL_DIR = '{model_dir}'\n")

  class Finished:  # jaxlm.train, as if it had trained the arm and exited.
    returncode = 0

    def __init__(self, *args, **kwargs):
      pass

    def poll(self):
      return 0
  monkeypatch.setattr(reproduce.subprocess, "Popen", Finished)
  high = next(a for a in manifest.arms if a.name == "high")
  records = experiments / "toy" / "runs"
  reproduce.run_jobs(manifest, [(high, 1)], str(family_runs), quick=False, records=str(records))
  record = records / "seed1" / "high"
  assert json.loads((record / "done.json").read_text())["eval/loss"] == 4.0
  assert (record / "config.gin").read_text() == "MODEL_DIR = '{family_runs}/seed1/high'\n"


def _write_run(folder, records, config=""):
  folder.mkdir(parents=True)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (folder / "config.gin").write_text(config)


def test_an_arms_compute_counts_what_it_restored_up_to_the_restored_step(tmp_path):
  """A branch restored at step 2 of a run that read 100 tokens a step (and was itself
  restored from a run of 1000 tokens) has spent 1000 + 200 before its own 50."""
  restores = "Stage.restore_from = @RestoreConfig()\nRestoreConfig.path = '{}'\n{}"
  _write_run(tmp_path / "first", [{"step": 10, "total/tokens": 1000.0}])
  _write_run(tmp_path / "stable", [{"step": s, "total/tokens": 100.0 * s} for s in (1, 2, 3, 4)],
             restores.format(tmp_path / "first", ""))
  _write_run(tmp_path / "branch", [{"step": 1, "total/tokens": 50.0}],
             restores.format(tmp_path / "stable", "RestoreConfig.step = 2\n"))
  metrics = reproduce.with_restored_compute({"total/tokens": 50.0}, str(tmp_path / "branch"),
                                            "tokens")
  assert metrics[reproduce.WITH_SOURCES] == 1000 + 200 + 50
  alone = reproduce.with_restored_compute({"total/tokens": 7.0}, str(tmp_path / "first"), "tokens")
  assert alone[reproduce.WITH_SOURCES] == 7.0


def test_a_headline_must_name_an_arm_and_say_what_it_measures(tmp_path, small_text_file):
  experiments = _family(tmp_path, small_text_file)
  path = experiments / "toy" / "manifest.json"
  manifest = json.loads(path.read_text())
  manifest["headlines"][0]["versus"] = "nosuch"
  path.write_text(json.dumps(manifest))
  with pytest.raises(reproduce.ReproduceError, match="headline 'High LR' names arm 'nosuch'"):
    reproduce.load_manifest(str(experiments), "toy")
  del manifest["headlines"][0]["what"]
  path.write_text(json.dumps(manifest))
  with pytest.raises(reproduce.ReproduceError, match=r"headline 'High LR' lacks \['what'\]"):
    reproduce.load_manifest(str(experiments), "toy")


def test_a_paper_number_under_a_metric_the_table_does_not_show_is_refused(tmp_path,
                                                                          small_text_file):
  experiments = _family(tmp_path, small_text_file)
  path = experiments / "toy" / "manifest.json"
  manifest = json.loads(path.read_text())
  manifest["tables"][0]["rows"][0]["paper"] = {"eval/wiki/loss": 9.5}
  path.write_text(json.dumps(manifest))
  with pytest.raises(reproduce.ReproduceError, match="row 'low': paper number for "
                                                     "'eval/wiki/loss', which is not among"):
    reproduce.load_manifest(str(experiments), "toy")


@pytest.mark.parametrize("args, expected", [
    (["nope"], "unknown family 'nope'"),
    (["toy", "--seeds=0"], "--seeds=0: give 1 or more"),
    (["toy", "--jobs=0"], "--jobs=0: give 1 or more"),
    (["toy", "--only=medium"], "family 'toy' has no arm 'medium'"),
])
def test_bad_input_is_one_line(tmp_path, small_text_file, capsys, args, expected):
  experiments = _family(tmp_path, small_text_file)
  assert reproduce.main([*args, f"--experiments_dir={experiments}",
                         f"--runs_dir={tmp_path / 'runs'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0], err


FAMILIES = reproduce.families(str(REPO_ROOT / "experiments"))


@pytest.mark.slow  # Minutes per family (one process per arm); .ci/run runs it after the suite.
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_quick(family, tmp_path):
  """The CI smoke test of each reproduction: every arm for a few steps."""
  folder = REPO_ROOT / "experiments" / family
  if (any("shared_corpus" in p.read_text() for p in folder.glob("*.gin"))
      and not os.path.isdir(shared_corpora_dir())):
    pytest.skip("the family reads ../shared/corpora, which is not present")
  # Two arms side by side (each after the arms it restores): CI's two cores, half the wall time.
  assert reproduce.main([family, "--quick", "--jobs=2", f"--runs_dir={tmp_path}"]) == 0


def _fully_recorded(family: str) -> bool:
  """Every seed of every training arm has its record (a family part-way through a re-run keeps
  its records for the next machine, and its README the last complete table, until it ends)."""
  experiments = str(REPO_ROOT / "experiments")
  manifest = reproduce.load_manifest(experiments, family)
  counts = reproduce.seed_counts(manifest, None, False)
  return all(os.path.isfile(os.path.join(reproduce.seed_dir(os.path.join(
      experiments, family, "runs"), arm.name, k), "done.json"))
             for arm in manifest.arms if arm.gin for k in range(counts[arm.name]))


RECORDED = [f for f in FAMILIES if _fully_recorded(f)]


@pytest.mark.parametrize("family", RECORDED or [pytest.param(None, marks=pytest.mark.skip(
    reason="no family has committed run records yet"))])
def test_a_familys_readme_table_is_what_its_committed_records_give(family, tmp_path):
  """Every number a fully recorded family's README shows regenerates from
  experiments/FAMILY/runs/ alone (a fresh machine, nothing trained): the README and its
  headlines are no hand edit."""
  experiments = tmp_path / "experiments"
  shutil.copytree(REPO_ROOT / "experiments", experiments)
  shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
  assert reproduce.main([family, "--no_train", f"--experiments_dir={experiments}",
                         f"--runs_dir={tmp_path / 'runs'}"]) == 0

  def measured(path):
    text = path.read_text(encoding="utf-8")
    return text[text.index(reproduce.BEGIN):text.index(reproduce.END)]
  ours = experiments / family / "README.md"
  assert measured(ours) == measured(REPO_ROOT / "experiments" / family / "README.md")
  assert ((experiments / family / "headlines.json").read_text()
          == (REPO_ROOT / "experiments" / family / "headlines.json").read_text())
