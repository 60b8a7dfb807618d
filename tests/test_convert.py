"""tools/convert.py: a Hugging Face model converted to a jaxlm checkpoint starts a run from
exactly its params; a trained run converted to Hugging Face loads in transformers."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# pylint: disable=wrong-import-position
from jaxlm import parallel
from jaxlm.training import trainer
from jaxlm.data.tokenizers import HuggingFaceTokenizer
from jaxlm.errors import UserError
from jaxlm.interop import import_hf
from jaxlm.model.transformer import forward
from jaxlm.checkpointing.restore import RestoreConfig, restore_into
from jaxlm.training.saved_run import load_saved_run
from jaxlm.training.train_step import sharded_init, state_shardings
from hf_fixtures import TINY_MOE, write_hf_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import convert  # noqa: E402
from helpers import QUIET, tiny_stage


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random Llama whose vocabulary fits the byte tokenizer the test stages use."""
  config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=96, vocab_size=384,
                                    max_position_embeddings=128)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float()
  path = str(tmp_path_factory.mktemp("hf") / "llama")
  model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
  with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write("{}")
  return path


def test_hf_to_jaxlm_starts_a_run_from_exactly_the_imported_params(hf_dir, tmp_path,
                                                                   small_text_file):
  out = str(tmp_path / "converted")
  assert convert.main(["hf_to_jaxlm", hf_dir, out]) == 0
  assert sorted(os.listdir(out)) == ["checkpoints", "model.gin", "tokenizer.json"]
  config, params = import_hf(hf_dir)
  stage = tiny_stage(small_text_file, 2, model=config, restore_from=RestoreConfig(path=out))

  # The restored state, before any update, holds the imported params bit for bit.
  mesh_config = parallel.MeshConfig()
  fresh = sharded_init(stage, state_shardings(stage, parallel.make_mesh(mesh_config),
                                              mesh_config.resolved_rules()), jax.random.key(1))
  restored, report = restore_into(stage.restore_from, fresh, stage.make_optimizer(),
                                  str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), params)
  assert not report.created and not report.skipped

  # And a trainer run with that stage loads every param from it.
  run_dir = tmp_path / "run"
  trainer.run(str(run_dir), [stage], trainer=QUIET)
  saved = json.loads((run_dir / "restore_report.json").read_text())
  assert saved["created"] == [] and saved["skipped"] == []
  assert len(saved["loaded"]) == len(jax.tree.leaves(params)) == 2 * 9 + 3


def test_jaxlm_to_hf_of_a_trained_run_loads_in_transformers(quick_trained_run, tmp_path):
  run_dir = str(quick_trained_run[0])
  out = str(tmp_path / "hf")
  assert convert.main(["jaxlm_to_hf", run_dir, out, "--step", "3",
                       "--max_shard_bytes", "200000"]) == 0
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  run = load_saved_run(run_dir, 3)
  tokens = np.random.default_rng(0).integers(0, run.stage.model.vocab_size, (2, 32))
  with run.scope():
    want = np.asarray(forward(run.params, run.stage.model, jnp.asarray(tokens, jnp.int32)))
  model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  with torch.no_grad():
    got = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _hf_tensors(directory):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  tensors = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(directory, name)))
  return tensors


@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
def test_hf_to_jaxlm_then_jaxlm_to_hf_through_the_cli_is_bitwise(tmp_path, small_text_file, moe):
  source, converted, back = (str(tmp_path / name) for name in ("hf", "converted", "back"))
  write_hf_model(source, small_text_file, **(TINY_MOE if moe else {}))
  assert convert.main(["hf_to_jaxlm", source, converted]) == 0
  assert convert.main(["jaxlm_to_hf", converted, back]) == 0
  want, got = _hf_tensors(source), _hf_tensors(back)
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype and got[name].tobytes() == tensor.tobytes(), name
  with open(os.path.join(source, "tokenizer.json"), "rb") as f:
    with open(os.path.join(back, "tokenizer.json"), "rb") as g:
      assert f.read() == g.read()
  # The source named its tokenizer by path, so its config.json has no special-token ids; the
  # converted run knows its tokenizer and adds them.
  tokenizer = HuggingFaceTokenizer(source)
  ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_id") for kind in ("bos", "eos", "pad")}
  with open(os.path.join(source, "config.json")) as f, open(os.path.join(back, "config.json")) as g:
    assert json.load(g) == {**json.load(f), **ids}


def test_a_converted_checkpoint_is_a_restore_source_not_a_run_to_resume(hf_dir, tmp_path,
                                                                         small_text_file):
  converted = str(tmp_path / "converted")
  assert convert.main(["hf_to_jaxlm", hf_dir, converted]) == 0
  with pytest.raises(UserError, match="converted from .* so it is a restore source, not a run "
                                      "to resume: train in a new MODEL_DIR"):
    trainer.run(converted, [tiny_stage(small_text_file, 2, model=import_hf(hf_dir)[0])],
                trainer=QUIET)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  assert convert.main(["hf_to_jaxlm", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
  assert "config.json does not exist" in capsys.readouterr().err
  assert convert.main(["jaxlm_to_hf", str(tmp_path), str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "has no checkpoints/ folder" in err and len(err.strip().splitlines()) == 1
