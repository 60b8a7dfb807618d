"""Small Hugging Face model directories made on the spot (no download, no torch): a random
jaxlm model exported by jaxlm.interop and a byte-level BPE tokenizer.json trained on a text."""

import pathlib

import jax
import numpy as np
import pytest

from jaxlm.model import ModelConfig
from jaxlm.model.transformer import init_params

# Llama with GQA 2; a vocabulary above the tokenizer's 400 ids.
TINY = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
            max_seq_len=128)


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
