"""Starting a run from a Hugging Face directory: Stage.restore_from reads its safetensors one
tensor at a time into exactly the imported params, experiments/continual/from_hf.gin trains it
with the directory's own tokenizer, and what does not fit is one clear line."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

# pylint: disable=wrong-import-position
from conftest import quick_run_args
from hf_fixtures import write_hf_model
from jaxlm import parallel, train
from jaxlm.training import preflight
from jaxlm.data.tokenizers import HuggingFaceTokenizer
from jaxlm.errors import UserError
from jaxlm.interop import load_hf_config
from jaxlm.checkpointing.restore import RestoreConfig, restore_into
from jaxlm.training.saved_run import load_saved_run
from jaxlm.training.train_step import abstract_state, sharded_init, state_shardings
from helpers import TINY, tiny_stage


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("from_hf")
  text = root / "corpus.txt"
  text.write_text(open(json.__file__, encoding="utf-8").read() * 3, encoding="utf-8")
  config, params = write_hf_model(root / "llama", text)
  return str(root / "llama"), config, params


def _fresh(stage):
  mesh_config = parallel.MeshConfig()
  shardings = state_shardings(stage, parallel.make_mesh(mesh_config),
                              mesh_config.resolved_rules())
  return sharded_init(stage, shardings, jax.random.key(1))


def test_restore_from_a_hugging_face_directory_loads_every_param_exactly(hf_dir, tmp_path,
                                                                         small_text_file):
  path, config, params = hf_dir
  assert load_hf_config(path) == config
  stage = tiny_stage(small_text_file, 2, model=config, restore_from=RestoreConfig(path=path))
  restored, report = restore_into(stage.restore_from, _fresh(stage), stage.make_optimizer(),
                                  str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), params)
  assert len(report.loaded) == len(jax.tree.leaves(params)) and not report.created
  assert not report.skipped
  assert json.loads((tmp_path / "restore_report.json").read_text())["source"] == path


def _two_steps_from_hf(gin_file, hf_path, run_dir, corpus, *extra):
  """`python -m jaxlm.train` arguments: `gin_file` (which starts from HF_DIR) for 2 float32
  steps on `corpus`, with its own warm-up (a share of the stage, so it fits)."""
  args = quick_run_args(run_dir, corpus, f"--gin.HF_DIR='{hf_path}'",
                        "--gin.ModelConfig.dtype='float32'", "--gin.ModelConfig.remat='none'",
                        "--gin.Stage.num_steps=2", "--gin.EvalConfig.every=2",
                        "--gin.TrainerConfig.checkpoint_every=2",
                        "--gin.TrainerConfig.sample_tokens=0",
                        "--gin.TrainerConfig.progress='log'", *extra)
  args[0] = f"--gin_file={gin_file}"
  return [a for a in args if "warmup_cosine.warmup_steps" not in a]


def test_from_hf_gin_trains_the_model_with_the_directory_tokenizer(hf_dir, tmp_path,
                                                                  small_text_file):
  path, _, params = hf_dir
  run_dir = tmp_path / "run"
  assert train.main(_two_steps_from_hf("experiments/continual/from_hf.gin", path, run_dir,
                                       small_text_file)) == 0
  report = json.loads((run_dir / "restore_report.json").read_text())
  assert len(report["loaded"]) == len(jax.tree.leaves(params)) and report["created"] == []
  run = load_saved_run(str(run_dir))
  assert run.tokenizer.fingerprint == HuggingFaceTokenizer(path).fingerprint
  assert run.stage.model.vocab_size == 512 and run.step == 2


def test_a_hugging_face_source_that_does_not_fit_is_one_line(hf_dir, small_text_file):
  path, config, _ = hf_dir
  with pytest.raises(UserError, match="has no optimizer state; set RestoreConfig.include_opt"):
    restore_into(RestoreConfig(path=path, include_optimizer=True), None, None, "")
  # The byte-level tiny model is not the directory's model: both shapes are named.
  stage = tiny_stage(small_text_file, 2, model=TINY, restore_from=RestoreConfig(path=path))
  mesh_config = parallel.MeshConfig()
  mesh, rules = parallel.make_mesh(mesh_config), mesh_config.resolved_rules()
  with jax.set_mesh(mesh):
    with pytest.raises(UserError, match=r"cannot load 'params/embed/embedding' \(512, 64\) into "
                                        r"'params/embed/embedding' \(\d+, \d+\)"):
      preflight.check_stage(stage, abstract_state(stage), 1, mesh, rules)
  assert config.vocab_size == 512


@pytest.mark.slow  # Three commands and transformers (about a minute); .ci/run runs it.
def test_a_llama_directory_upcycled_trained_and_exported_loads_as_mixtral(hf_dir, tmp_path,
                                                                         small_text_file):
  """The command chain: a Llama-architecture directory -> experiments/upcycling/from_hf.gin
  (upcycled to 8 experts in its first stage, trained 2 steps) -> tools/convert.py jaxlm_to_hf
  -> transformers' MixtralForCausalLM, whose logits are jaxlm's."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from conftest import REPO_ROOT  # pylint: disable=import-outside-toplevel
  from jaxlm.model import forward  # pylint: disable=import-outside-toplevel
  path, _, _ = hf_dir
  run_dir, out = tmp_path / "moe", tmp_path / "mixtral"
  assert train.main(_two_steps_from_hf("experiments/upcycling/from_hf.gin", path, run_dir,
                                       small_text_file,
                                       "--gin.moe/ModelConfig.moe_dispatch='dropless'")) == 0
  done = subprocess.run([sys.executable, "tools/convert.py", "jaxlm_to_hf", str(run_dir),
                         str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
  run = load_saved_run(str(run_dir))
  assert run.stage.model.num_experts == 8 and run.step == 2
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(0, 400, (2, 12))
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(jax.device_get(run.params), run.stage.model, tokens))
  assert float(np.abs(ours - theirs).max()) < 1e-4
