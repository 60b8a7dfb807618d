"""Hugging Face Llama-family and Mixtral import: random tiny transformers models (no download),
saved as safetensors, imported, and their logits compared with PyTorch's; plus one clear error
per kind of bad input."""

import json
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# pylint: disable=wrong-import-position
from hf_fixtures import HF_MODEL_NAMES, LLAMA3, hf_tokens, make_hf_model
from jaxlm.errors import UserError
from jaxlm.interop import gin_model_text, import_hf, load_hf_config, model_config_from_hf
from jaxlm.interop.hf_config import router_aux_loss_coef
from jaxlm.model import ModelConfig
from jaxlm.model.transformer import decode_step, forward, init_cache, prefill

@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: make_hf_model(str(root), name) for name in HF_MODEL_NAMES}


@pytest.mark.parametrize("name", list(HF_MODEL_NAMES))
def test_logits_match_pytorch(models, name):
  path, model = models[name]
  config, params = import_hf(path)
  tokens = hf_tokens()
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(forward(params, config, jnp.asarray(tokens)))
  # Observed max |difference| on CPU float32: 1.7e-6 .. 3.0e-6 over these models (logits ~3;
  # Mixtral 2.6e-6).
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_imported_configs(models):
  assert load_hf_config(models["llama_mha"][0]).num_kv_heads == 4
  tied = load_hf_config(models["llama_gqa4_tied"][0])
  assert tied.tie_embeddings and tied.num_heads == 8 and tied.num_kv_heads == 2
  assert os.path.exists(os.path.join(models["llama_gqa4_tied"][0],
                                     "model.safetensors.index.json"))
  llama3 = load_hf_config(models["llama3"][0])
  assert (llama3.rope_scaling, llama3.rope_original_max_len, llama3.head_dim) == (
      "llama3", 32, 32)
  mha = load_hf_config(models["llama_mha"][0])
  assert (mha.rope_theta, mha.norm_eps) == (123456.0, 3e-5)
  assert load_hf_config(models["qwen2"][0]).attention_bias
  assert not load_hf_config(models["mistral"][0]).attention_bias
  mixtral = load_hf_config(models["mixtral"][0])
  assert (mixtral.moe_layers, mixtral.num_experts, mixtral.experts_per_token, mixtral.mlp_dim,
          mixtral.router, mixtral.moe_dispatch, mixtral.router_z_loss_weight,
          mixtral.rope_theta) == ("all", 4, 2, 96, "topk_softmax", "dropless", 0.0, 1e6)
  assert mixtral.load_balancing_weight == 0.02  # 0.02 x k / L with k = L = 2.


MIXTRAL_HUB = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=64,
                   num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                   intermediate_size=96, vocab_size=128, max_position_embeddings=128)


def test_mixtral_config_fields():
  """transformers' MixtralConfig defaults fill what config.json leaves out; the balancing
  coefficient converts to jaxlm's per-layer weight (x k / L) and back."""
  config = model_config_from_hf(MIXTRAL_HUB)
  assert (config.rope_theta, config.norm_eps, config.num_experts, config.experts_per_token,
          config.max_seq_len) == (1e6, 1e-5, 8, 2, 128)
  config = model_config_from_hf({**MIXTRAL_HUB, "router_aux_loss_coef": 0.02,
                                 "num_experts_per_tok": 3})
  assert config.load_balancing_weight == pytest.approx(0.02 * 3 / 4)
  assert router_aux_loss_coef(config) == 0.02
  # A sliding window shorter than the context caps it, as for Mistral: exact up to the window.
  assert model_config_from_hf({**MIXTRAL_HUB, "sliding_window": 64}).max_seq_len == 64
  assert model_config_from_hf({**MIXTRAL_HUB, "sliding_window": 4096}).max_seq_len == 128


def test_refuses_router_jitter_noise():
  with pytest.raises(UserError, match=r"^config.json router_jitter_noise=0.01 is not supported "
                                      r"\(jaxlm's router adds no training noise\); set it to 0"):
    model_config_from_hf({**MIXTRAL_HUB, "router_jitter_noise": 0.01})
  assert model_config_from_hf({**MIXTRAL_HUB, "router_jitter_noise": 0.0}).moe_layers == "all"


def test_hub_config_format_reads_the_same():
  """Files on the Hub carry rope_theta and rope_scaling (keyed 'type' or 'rope_type') at the
  top level; transformers 5 writes rope_parameters. Both give one ModelConfig."""
  base = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96, vocab_size=128,
              max_position_embeddings=128, rms_norm_eps=1e-5)
  new = model_config_from_hf({**base, "rope_parameters": LLAMA3})
  scaling = {k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")}
  for key in ("type", "rope_type"):
    old = model_config_from_hf({**base, "rope_theta": 500000.0,
                                "rope_scaling": {key: "llama3", **scaling}})
    assert old == new
  assert model_config_from_hf({**base, "rope_theta": 5.0}).rope_scaling is None


@pytest.mark.parametrize("name", ["llama3", "mistral", "mixtral"])
def test_gin_model_file_round_trips_and_binds_only_what_applies(models, name):
  config = load_hf_config(models[name][0])
  text = gin_model_text(config, name)
  # RoPE-scaling factors only where the model scales its rotary frequencies (llama3), MoE fields
  # only where it has MoE layers.
  assert ("ModelConfig.rope_scaling_factor" in text) == (config.rope_scaling == "llama3")
  assert ("ModelConfig.num_experts" in text) == (name == "mixtral")
  gin.clear_config()
  try:
    gin.parse_config(text)
    assert ModelConfig() == config
  finally:
    gin.clear_config()


def test_decode_with_attention_biases(models):
  """The KV-cache path adds the q/k/v biases too: prefill + steps equal the full forward."""
  config, params = import_hf(models["qwen2"][0])
  tokens = jnp.asarray(hf_tokens(1, (2, 12)))
  full = np.asarray(jax.jit(forward, static_argnums=1)(params, config, tokens))
  cache = init_cache(config, 2, 16)
  logits, cache = jax.jit(prefill, static_argnums=1)(params, config, cache, tokens[:, :8])
  np.testing.assert_allclose(logits, full[:, 7], atol=1e-4)
  step = jax.jit(decode_step, static_argnums=1)  # One compile, not op by op.
  for i in range(8, 12):
    logits, cache = step(params, config, cache, tokens[:, i:i + 1],
                         jnp.full((2, 1), i, jnp.int32))
    np.testing.assert_allclose(logits, full[:, i], atol=1e-4)


def test_bfloat16_checkpoint(models, tmp_path):
  """numpy has no bfloat16: such tensors are read through torch, still one at a time."""
  path = models["llama_mha"][0]
  bf16 = transformers.AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16)
  bf16.save_pretrained(tmp_path / "bf16", safe_serialization=True)
  _, params = import_hf(str(tmp_path / "bf16"))
  want = bf16.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layer_1"]["mlp"]["down"], want)


def _copy(models, name, tmp_path):
  return shutil.copytree(models[name][0], tmp_path / name)


def _edit_config(path, **changes):
  config_path = os.path.join(path, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config.update(changes)
  with open(config_path, "w") as f:
    json.dump(config, f)


def test_refuses_unsupported_architecture(models, tmp_path):
  path = _copy(models, "llama_mha", tmp_path)
  _edit_config(path, architectures=["GPT2LMHeadModel"])
  with pytest.raises(UserError, match=r"architectures=\['GPT2LMHeadModel'\].*LlamaForCausalLM"):
    import_hf(str(path))


@pytest.mark.parametrize("model_type", ["gpt_neox", "mistral", None])
def test_refuses_a_model_type_that_is_not_its_architectures(models, tmp_path, model_type):
  path = _copy(models, "llama_mha", tmp_path)
  _edit_config(path, model_type=model_type)
  with pytest.raises(UserError, match=f"model_type={model_type!r} with architectures="
                                      r"\['LlamaForCausalLM'\]; jaxlm imports model_type"):
    import_hf(str(path))


def test_refuses_missing_shard(models, tmp_path):
  path = _copy(models, "llama_gqa4_tied", tmp_path)
  with open(path / "model.safetensors.index.json") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(path / shard)
  with pytest.raises(UserError, match=f"names the shard {shard}, which is missing"):
    import_hf(str(path))


def test_refuses_shape_mismatch(models, tmp_path):
  path = _copy(models, "llama_gqa4_tied", tmp_path)
  _edit_config(path, vocab_size=100)
  with pytest.raises(UserError, match=r"model\.embed_tokens\.weight has shape \[128, 64\] .*"
                                      r"implies \[100, 64\]"):
    import_hf(str(path))


def test_refuses_a_missing_expert(models, tmp_path):
  path = _copy(models, "mixtral", tmp_path)
  with open(path / "model.safetensors.index.json") as f:
    index = json.load(f)
  del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  with open(path / "model.safetensors.index.json", "w") as f:
    json.dump(index, f)
  with pytest.raises(UserError, match=r"lacks 1 of the 41 tensors config\.json implies, e\.g\. "
                                      r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\."
                                      r"weight \(for layer_1/mlp/down\)"):
    import_hf(str(path))


def test_refuses_transformers_fused_experts_with_the_way_to_resave(models, tmp_path):
  """transformers 5 saves the Hub's per-expert names by default; asked not to, it writes its
  fused in-memory tensors, which jaxlm names and refuses."""
  if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers 4 keeps its experts apart")
  models["mixtral"][1].save_pretrained(tmp_path / "fused", save_original_format=False)
  with pytest.raises(UserError, match=r"^model\.layers\.\d\.mlp\.(gate\.weight|experts\.\w+) "
                                      r"is transformers 5's fused in-memory layout of Mixtral.*"
                                      r"save_original_format=True"):
    import_hf(str(tmp_path / "fused"))


def test_refuses_pickle_checkpoints(models, tmp_path):
  path = tmp_path / "pickled"
  path.mkdir()
  shutil.copy(os.path.join(models["llama_mha"][0], "config.json"), path)
  # Not a real pickle: were it ever unpickled, this test would fail with an unpickling error.
  (path / "pytorch_model.bin").write_bytes(b"not a pickle")
  with pytest.raises(UserError, match="only pickle checkpoints.*pytorch_model.bin.*convert "
                                      "them to safetensors"):
    import_hf(str(path))
