"""tools/reproduce.py: a family's arms run (resumably), their table (ours beside the paper's)
and plots are regenerated; every family in experiments/ passes its --quick smoke run."""

import json
import os

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
               {"name": "low", "gin": "low.gin"}, {"name": "high", "gin": "high.gin"}],
      "tables": [{"title": "Final loss", "metrics": ["eval/loss"], "paper": "Nobody 2099, Fig. 1",
                  "rows": [{"arm": "low", "paper": {"eval/loss": 9.5}},
                           {"arm": "high", "label": "high LR", "paper": {"eval/loss": 9.25}}]}],
      # A report after the arms: a script whose output (here: where the runs are) is quoted.
      "reports": [{"title": "Where the runs are",
                   "command": ["-c", "import os, sys; print(sorted(f for f in os.listdir(sys.argv[1])"
                                     " if not f.startswith('.')))",
                               "{runs}"]}],
      "notes": "A toy: nothing to reproduce."}
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
  for arm, paper in (("low", "9.5"), ("high LR", "9.25")):
    final = reproduce.final_metrics(str(runs / "toy-quick" / arm.split()[0]))
    assert final["step"] == 3
    row = f"| {arm} | {final['total/tokens']:.4g} | {final['eval/loss']:.4g} | {paper} |"
    assert row in readme, readme
  assert "Nobody 2099, Fig. 1" in readme and "A toy: nothing to reproduce." in readme
  assert "![train loss](plots/train_loss.png)" in readme
  assert "**Where the runs are**\n\n['README.md', 'high', 'low', 'note', 'plots']" in readme
  # The arms shared one compilation cache beside them (unless the caller chose another).
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    assert os.listdir(runs / "toy-quick" / ".jax_cache")
  assert (runs / "toy-quick" / "note" / "note.txt").read_text() == "made"
  assert (runs / "toy-quick" / "plots" / "eval_loss.png").stat().st_size > 1000


def test_the_table_goes_between_the_markers_of_the_family_readme(tmp_path, small_text_file):
  """Without --quick the family's README is rewritten between its markers only (arms already
  done are read, not re-run)."""
  experiments = _family(tmp_path, small_text_file)
  runs = tmp_path / "runs" / "toy"
  for arm, loss in (("low", 5.0), ("high", 4.0)):  # As if both arms had finished.
    (runs / arm).mkdir(parents=True)
    record = {"step": 3, "eval/loss": loss, "total/tokens": 768.0, "train/loss": loss}
    (runs / arm / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (runs / arm / "done.json").write_text(json.dumps(record))
  assert reproduce.main(["toy", f"--runs_dir={tmp_path / 'runs'}",
                         f"--experiments_dir={experiments}"]) == 0
  readme = (experiments / "toy" / "README.md").read_text()
  assert readme.startswith("# Toy\n\nOur words.") and readme.endswith("More words.\n")
  assert "old" not in readme
  assert "| low | 768 | 5 | 9.5 |" in readme and "| high LR | 768 | 4 | 9.25 |" in readme
  assert (experiments / "toy" / "plots" / "train_loss.png").exists()


@pytest.mark.parametrize("args, expected", [
    (["nope"], "unknown family 'nope'"),
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
  assert reproduce.main([family, "--quick", f"--runs_dir={tmp_path}"]) == 0
