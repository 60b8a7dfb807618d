"""Small Hugging Face model directories made on the spot (no download, no torch): a random
jaxlm model exported by jaxlm.interop and a byte-level BPE tokenizer.json trained on a text."""

import os
import pathlib

import jax
import numpy as np
import pytest

from jaxlm.model import ModelConfig
from jaxlm.model.transformer import init_params

# Llama with GQA 2; a vocabulary above the tokenizer's 400 ids.
TINY = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
            max_seq_len=128)
# What makes TINY a Mixtral: 4 experts, top 2, in every block.
TINY_MOE = dict(moe_layers="all", num_experts=4, experts_per_token=2)


def train_bpe_tokenizer(path, text_file, vocab_size: int = 400) -> None:
  """A byte-level BPE tokenizer.json with <pad>, <s>, </s> as ids 0, 1, 2."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train([str(text_file)], trainer)
  tok.save(str(path))


def write_hf_model(model_dir, text_file, seed: int = 0, **config) -> tuple[ModelConfig, dict]:
  """A random Llama-family model with its tokenizer.json in `model_dir`; (config, params)."""
  pytest.importorskip("safetensors")
  from jaxlm.interop import export_hf  # pylint: disable=import-outside-toplevel
  model_config = ModelConfig(**{**TINY, **config})
  params = jax.tree.map(np.asarray, init_params(model_config, jax.random.key(seed)))
  pathlib.Path(model_dir).mkdir(parents=True, exist_ok=True)
  tokenizer = pathlib.Path(model_dir) / "tokenizer.json"
  train_bpe_tokenizer(tokenizer, text_file)
  export_hf(params, model_config, str(model_dir), tokenizer=str(tokenizer),
            max_shard_bytes=100_000)
  return model_config, params


# Random tiny transformers models for import and export tests. initializer_range 0.1: logits
# of magnitude ~3, so a wrong mapping or rotary angle shows (the llama3 model without its
# scaling is off by 1.8).
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
               intermediate_size=96, initializer_range=0.1)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=32)
HF_MODEL_NAMES = ("llama_mha", "llama_gqa4_tied", "llama3", "mistral", "qwen2", "mixtral")


def _rope(transformers, rope_parameters):
  """transformers 5 takes rope_parameters; 4.x the Hub's rope_theta and rope_scaling."""
  if int(transformers.__version__.split(".")[0]) >= 5:
    return {"rope_parameters": rope_parameters}
  scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
  return {"rope_theta": rope_parameters["rope_theta"],
          "rope_scaling": None if scaling["rope_type"] == "default" else scaling}


def _hf_model_spec(transformers, name):
  """(config class, its arguments, save_pretrained's max_shard_size or None)."""
  return {
      # GQA 1 (as many kv heads as heads), untied, an unusual theta and norm epsilon.
      "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                        rms_norm_eps=3e-5, **_rope(transformers, dict(
                                            rope_type="default", rope_theta=123456.0))), None),
      # GQA 4, tied embeddings, sharded (an index and several files).
      "llama_gqa4_tied": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2,
                                              tie_word_embeddings=True), "40KB"),
      # Llama 3.1 rope scaling (the original context is short so every band is exercised), and
      # a head_dim that is not hidden_size / heads.
      "llama3": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     **_rope(transformers, LLAMA3)), None),
      "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2), None),
      "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2), None),
      # 4 experts, top 2, sharded so that a param's experts lie in several files.
      "mixtral": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2,
                                        router_aux_loss_coef=0.02), "100KB"),
  }[name]


def make_hf_model(root, name):
  """One of HF_MODEL_NAMES saved under `root`, every tensor random; (path, the torch model)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cls, kwargs, shard = _hf_model_spec(transformers, name)
  config = getattr(transformers, cls)(**HF_TINY, **kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():  # HF initializes norms to 1 and biases to 0: make every tensor count.
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if pname.endswith("norm.weight") else 0.0) + 0.3 * torch.randn_like(p))
  path = os.path.join(root, name)
  extra = {"max_shard_size": shard} if shard else {}
  model.save_pretrained(path, safe_serialization=True, **extra)
  return path, model


def hf_tokens(seed=0, shape=(2, 48)):
  return np.random.default_rng(seed).integers(0, HF_TINY["vocab_size"], shape).astype(np.int32)
