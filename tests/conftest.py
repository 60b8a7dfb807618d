"""Shared fixtures: gin state is global, so every test starts from an empty config."""

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import textwrap

import gin
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_tool(name: str):
  """A script in tools/ as a module (tools/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Dataclasses and pickling look their module up by name.
  spec.loader.exec_module(module)
  return module


# The files that take longest with the slow tests included (`pytest -m "slow or not slow"
# --durations=40`, 2026-12-07: the reproduction families' quick runs 17 minutes in all, the
# kill/resume runs 6, the growth and layout subprocesses 4 and 3; with the compilation cache,
# 2026-12-08, the quick runs took 8 minutes).
LONGEST_FILES = ("test_reproduce.py", "test_fault_tolerance.py", "test_growth.py",
                 "test_state_layout.py")


def pytest_collection_modifyitems(items):
  """The longest files first, the rest in their order. CI runs every test in one invocation
  with `--no-loadscope-reorder`, so its two xdist workers start on these and neither idles at
  the end behind one of them."""
  def rank(item):
    name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
  items.sort(key=rank)


def pytest_configure(config):
  """One XLA compilation cache for the session, its xdist workers and the command-line runs
  they start (which compile the same small programs again and again), in a temporary folder of
  its own rather than the user's ~/.cache. Workers inherit it from the controlling process.
  JAXLM_COMPILATION_CACHE=none in the environment keeps it off (to time the suite without it)."""
  if not hasattr(config, "workerinput") and os.environ.get("JAXLM_COMPILATION_CACHE") != "none":
    config.xla_cache = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
    os.environ["JAXLM_COMPILATION_CACHE"] = config.xla_cache


def pytest_unconfigure(config):
  if hasattr(config, "xla_cache"):
    shutil.rmtree(config.xla_cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def small_text_file(tmp_path):
  """A ~20 KB real text (a standard-library module's source): no download, no shared corpora."""
  path = tmp_path / "corpus.txt"
  path.write_text(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  return path


def as_defaults(flags):
  """--gin.NAME=VALUE flags as --gin_defaults: settings a test harness shares between runs,
  some of which a given run (a multi-stage gin file) overrides in every stage."""
  return [f"--gin_defaults={f[len('--gin.'):].replace('=', ' = ', 1)}" if f.startswith("--gin.")
          else f for f in flags]


def quick_run_args(model_dir, text_file, *extra):
  """CLI arguments for a few-step run of the quickstart experiment on a small text file (the
  shared settings as --gin_defaults; `extra` as given)."""
  return [*as_defaults([
      "--gin_file=experiments/quickstart.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.Stage.num_steps=6",
      "--gin.DataConfig.source=@text_files",
      f"--gin.text_files.paths='{text_file}'",
      "--gin.DataConfig.seq_len=64",
      "--gin.DataConfig.batch_size=4",
      "--gin.DataConfig.max_eval_batches=2",
      "--gin.warmup_cosine.warmup_steps=2",
      "--gin.TrainerConfig.log_every=2",
      "--gin.EvalConfig.every=3",
      "--gin.TrainerConfig.checkpoint_every=3",
      "--gin.TrainerConfig.sample_tokens=16",
      "--gin.TrainerConfig.peak_flops_per_device=1e12",
  ]), *extra]


@pytest.fixture(scope="session")
def quick_trained_run(tmp_path_factory):
  """(MODEL_DIR, corpus) of one quickstart run of 6 steps on a small text, checkpoints at steps
  3 and 6, a sample printed at the end: shared by the tests of the tools that read a trained run
  (eval, generate, lm-evaluation-harness), which must not write into it."""
  root = tmp_path_factory.mktemp("quick_trained_run")
  corpus = root / "corpus.txt"
  corpus.write_text(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"), encoding="utf-8")
  from jaxlm import train  # pylint: disable=import-outside-toplevel
  assert train.main(quick_run_args(root / "run", corpus,
                                   "--gin.TrainerConfig.progress='log'")) == 0
  return root / "run", corpus
