"""Every gin file under experiments/ and gin/ parses and builds: each stage's optimizer,
schedule, sources (resolved, not read), shardings and model on abstract shapes (no training,
no compute), and each transition between stages."""

import dataclasses
import os
import pathlib
import re

import flax.linen as nn
import jax
import pytest

from conftest import REPO_ROOT
from jaxlm import parallel
from jaxlm.config import gin_config
from jaxlm.training import preflight
from jaxlm.methods.continual.vocab_expansion import byte_tokenizer_json, extend_tokenizer_json
from jaxlm.data.sources import shared_corpora_dir
from jaxlm.training.saved_run import stages_from_config, upgrade_saved_config
from jaxlm.training.stages import configured_stages
from jaxlm.training.train_step import abstract_state
from hf_fixtures import write_hf_model

# Not the finished runs' saved configs in experiments/FAMILY/runs/ (records of what ran, with
# their machine's paths in them; tools/reproduce.py keeps them).
GIN_FILES = sorted(str(p.relative_to(REPO_ROOT))
                   for folder in ("experiments", "gin") for p in (REPO_ROOT / folder).rglob("*.gin")
                   if "runs" not in p.relative_to(REPO_ROOT / folder).parts[1:-1])
# A building block alone has no run: it is checked inside the shared pretraining run.
RUN = "gin/runs/pretrain.gin"


def test_there_are_gin_files_to_check():
  assert "experiments/quickstart.gin" in GIN_FILES and RUN in GIN_FILES


def _with_includes(path: pathlib.Path) -> str:
  """A gin file's text followed by the texts of the experiment files it includes."""
  text = path.read_text()
  for name in re.findall(r"^include '(experiments/[^']+)'", text, re.MULTILINE):
    text += "\n" + _with_includes(REPO_ROOT / name)
  return text


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_gin_file_parses_and_builds_on_abstract_shapes(gin_file, tmp_path, monkeypatch,
                                                      small_text_file):
  monkeypatch.chdir(REPO_ROOT)
  files = [gin_file] if pathlib.Path(gin_file).parts[0] == "experiments" else [RUN, gin_file]
  if pathlib.Path(gin_file).parts[:2] == ("gin", "parameterization"):  # Sized for a real model.
    files = [RUN, "gin/models/125m.gin", gin_file]
  bindings = [f"MODEL_DIR = '{tmp_path / 'run'}'"]
  text = _with_includes(REPO_ROOT / gin_file)
  if "shared_corpus" in text and not os.path.isdir(shared_corpora_dir()):
    pytest.skip("reads ../shared/corpora, which is not present")
  source = re.search(r"^RestoreConfig\.path = %(\w+)", text, re.MULTILINE)
  # Its first stage transforms the restored model (RestoreConfig.model): a source must exist.
  transforms_source = source and "RestoreConfig.model" in text and "%HF_DIR" not in text
  if "%HF_DIR" in text:  # Starts from a Hugging Face model.
    write_hf_model(tmp_path / "hf", small_text_file, max_seq_len=2048)
    bindings.append(f"HF_DIR = '{tmp_path / 'hf'}'")
  elif transforms_source:  # Stands in for the arm's run: a directory of the source's shapes
    # (a Hugging Face one, which has no data position to continue).
    bindings += [f"{source.group(1)} = '{tmp_path / 'source'}'",
                 "RestoreConfig.continue_data = False"]
  elif source:  # Restores another arm's run, made by reproduce.py.
    bindings.append("Stage.restore_from = None")
  if "%EXTENDED_TOKENIZER" in text:  # A byte-level vocabulary grown on new text.
    extended = extend_tokenizer_json(byte_tokenizer_json(), [small_text_file.read_text()], 50)
    (tmp_path / "extended.json").write_text(extended, encoding="utf-8")
    bindings.append(f"EXTENDED_TOKENIZER = '{tmp_path / 'extended.json'}'")
  gin_config.parse(files, bindings)
  stages = configured_stages()
  assert stages
  if transforms_source:
    write_hf_model(tmp_path / "source", small_text_file,
                   **dataclasses.asdict(stages[0].restore_from.model))
  mesh_config = parallel.MeshConfig()
  mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    states = [abstract_state(stage) for stage in stages]
    for stage, state in zip(stages, states):
      preflight.check_stage(stage, state, 1, mesh, rules)
    preflight.check_transitions(stages, states)


def test_a_config_saved_with_named_transitions_still_builds_its_stages():
  """Runs saved before transitions were gin configurables wrote their names as strings."""
  saved = "\n".join([
      "include 'gin/runs/pretrain.gin'", "MODEL_DIR = '/tmp/unused'",
      "run.stages = [@small/Stage(), @large/Stage()]", "large/ModelConfig.num_layers = 8",
      "large/Stage.transition = ['grow_width', 'grow_depth']",
      "large/grow_depth.order = 'interleave'"])
  assert "[@grow_width, @grow_depth]" in upgrade_saved_config(saved)
  stages = stages_from_config(saved)
  assert stages[1].transition_names == ["grow_width", "grow_depth"]
  assert upgrade_saved_config("dense/Stage.transition = 'densify'") == (
      "dense/Stage.transition = [@densify]")
