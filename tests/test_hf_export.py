"""Hugging Face export: import then export gives the original tensors bit for bit; a randomly
initialised jaxlm model (Llama, Qwen2 or Mixtral), exported, loads in transformers with the same
logits; sharding; one line for what no exported architecture expresses."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# pylint: disable=wrong-import-position
from safetensors import safe_open

from hf_fixtures import (HF_MODEL_NAMES, TINY, TINY_MOE, hf_tokens, make_hf_model,
                         train_bpe_tokenizer)
from jaxlm.data.tokenizers import HuggingFaceTokenizer
from jaxlm.errors import UserError
from jaxlm.interop import export_hf, import_hf
from jaxlm.interop.hf_import import checkpoint_files
from jaxlm.model import ModelConfig
from jaxlm.model.transformer import forward, init_params

RANDOM = {
    # GQA 2, untied, an unusual theta and epsilon, sharded on export.
    "gqa": dict(num_heads=4, num_kv_heads=2, rope_theta=54321.0, norm_eps=3e-5),
    # Qwen2: q/k/v biases.
    "bias": dict(num_heads=4, num_kv_heads=2, attention_bias=True),
    # Tied, llama3 scaling (every band, as in the import test), head_dim != d_model / heads.
    "tied_llama3": dict(num_heads=4, num_kv_heads=1, head_dim=32, tie_embeddings=True,
                        rope_theta=500000.0, rope_scaling="llama3", rope_original_max_len=32),
    # Mixtral: 4 experts, top 2, tied; dropless, as transformers computes it (no token dropped).
    "moe": dict(num_heads=4, num_kv_heads=2, tie_embeddings=True, moe_dispatch="dropless",
                load_balancing_weight=0.005, **TINY_MOE),
}
ARCHITECTURE = {"bias": "Qwen2ForCausalLM", "moe": "MixtralForCausalLM"}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hf"))
  return {name: make_hf_model(root, name)[0] for name in HF_MODEL_NAMES}


def _tensors(model_dir):
  out = {}
  for name, path in checkpoint_files(model_dir).items():
    with safe_open(path, framework="numpy") as f:
      out[name] = f.get_tensor(name)
  return out


@pytest.mark.parametrize("name", list(HF_MODEL_NAMES))
def test_import_then_export_is_bitwise_identical(hf_models, name, tmp_path):
  config, params = import_hf(hf_models[name])
  export_hf(params, config, str(tmp_path / "out"))
  want, got = _tensors(hf_models[name]), _tensors(str(tmp_path / "out"))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype == np.float32 and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _random_params(config, seed):
  """init_params, with norms and biases moved off 1 and 0 so that each one counts."""
  params = jax.device_get(init_params(config, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
      if x.ndim == 1 or "bias" in jax.tree_util.keystr(path) else x, params)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  out = {}
  for i, (name, fields) in enumerate(RANDOM.items()):
    config = ModelConfig(vocab_size=128, d_model=64, num_layers=2, mlp_dim=96, max_seq_len=128,
                         init_std=0.1, **fields)
    params = _random_params(config, i)
    if name == "bias":  # jax arrays, not numpy, go in too.
      params = jax.tree.map(jnp.asarray, params)
    path = str(root / name)
    export_hf(params, config, path, max_shard_bytes=40_000 if name == "gqa" else 1 << 30)
    out[name] = (path, config, params)
  return out


@pytest.mark.parametrize("name", list(RANDOM))
def test_exported_logits_match_transformers(exported, name):
  path, config, params = exported[name]
  model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
  assert type(model).__name__ == ARCHITECTURE.get(name, "LlamaForCausalLM")
  assert not any(info.values()), info  # Every tensor used, none missing.
  tokens = hf_tokens(3)
  with torch.no_grad():
    got = model.float().eval()(torch.from_numpy(tokens).long()).logits.numpy()
  want = np.asarray(forward(params, config, jnp.asarray(tokens)))
  # Observed max |difference| on CPU float32: 1.8e-6 .. 2.4e-6 over these models (logits ~3;
  # Mixtral 3.0e-6 with logits ~4).
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_sharded_export_has_an_index_naming_every_tensor(exported):
  path = exported["gqa"][0]
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(weight_map.values())) == shards
  held = set()
  for shard in shards:
    with safe_open(os.path.join(path, shard), framework="numpy") as f:
      held |= {n for n in f.keys() if weight_map[n] == shard}
  assert held == set(weight_map) and len(weight_map) == 2 + 2 * 9 + 1  # embed, layers, norm, head
  assert not os.path.exists(os.path.join(exported["bias"][0], "model.safetensors.index.json"))


def test_mixtral_is_written_as_on_the_hub(exported):
  """Per-expert tensors (what the Hub holds and transformers 5 saves and loads), and a
  config.json whose balancing coefficient is jaxlm's weight x L / k."""
  path, config, _ = exported["moe"]
  names = set(checkpoint_files(path))
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
  assert "model.layers.0.block_sparse_moe.gate.weight" in names
  assert not any("gate_up_proj" in n or ".mlp." in n for n in names)
  assert len(names) == 1 + 2 * (2 + 4 + 1 + 3 * 4) + 1  # embed, blocks, norm; tied: no head.
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert (saved["num_local_experts"], saved["num_experts_per_tok"], saved["sliding_window"],
          saved["output_router_logits"], saved["router_aux_loss_coef"]) == (4, 2, None, False,
                                                                           0.005)
  # Mixtral's config has no init_std and no z-loss (a training loss: the model is the same).
  back = import_hf(path)[0]
  assert (back.init_std, back.router_z_loss_weight) == (0.02, 0.0)
  assert dataclasses.replace(back, init_std=0.1, router_z_loss_weight=0.001) == config


@pytest.mark.parametrize("fields, line", [
    (dict(moe_layers="every_other"), r"moe_layers='every_other' makes only some blocks MoE"),
    (dict(moe_layers=(1,)), r"moe_layers=\(1,\) makes only some blocks MoE layers"),
    (dict(TINY_MOE, router="softmax_topk"),
     r"router='softmax_topk' has no Mixtral equivalent: Mixtral renormalises"),
    (dict(TINY_MOE, attention_bias=True), r"attention_bias=True \(q/k/v biases\) has no Mixtral"),
])
def test_export_refuses_what_mixtral_cannot_express(fields, line, tmp_path):
  with pytest.raises(UserError, match="^ModelConfig." + line) as refused:
    export_hf({}, ModelConfig(**{**TINY, **fields}), str(tmp_path / "out"))
  assert "\n" not in str(refused.value) and not any((tmp_path / "out").iterdir())


def test_tokenizer_json_is_copied(exported, tmp_path):
  _, config, params = exported["gqa"]
  source = tmp_path / "tokenizer.json"
  source.write_text('{"version": "1.0"}')
  written = export_hf(params, config, str(tmp_path / "out"), tokenizer=str(source))
  assert "tokenizer.json" in written
  assert (tmp_path / "out" / "tokenizer.json").read_text() == source.read_text()


def test_exported_tokenizer_loads_with_auto_tokenizer(exported, tmp_path, small_text_file):
  _, config, params = exported["gqa"]
  train_bpe_tokenizer(tmp_path / "tokenizer.json", small_text_file)
  ours = HuggingFaceTokenizer(tmp_path / "tokenizer.json")
  out = tmp_path / "out"
  export_hf(params, config, str(out), tokenizer=ours)
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  text = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text) ✓"
  assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).tolist()
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
  saved = json.loads((out / "config.json").read_text())
  assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 0)
  assert transformers.AutoConfig.from_pretrained(str(out)).eos_token_id == ours.eos_id == 2


def test_export_refuses_a_directory_with_a_model_and_mismatched_params(exported, tmp_path):
  path, config, params = exported["gqa"]
  with pytest.raises(UserError, match="already holds .*config.json.*empty directory"):
    export_hf(params, config, path)
  wider = ModelConfig(**{**config.__dict__, "mlp_dim": 128})
  with pytest.raises(UserError, match=r"layer_0/mlp/gate has shape \[64, 96\].*\[128, 64\]"):
    export_hf(params, wider, str(tmp_path / "out"))
