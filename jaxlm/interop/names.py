"""The one table between Hugging Face Llama-family tensor names and jaxlm params, with each
tensor's layout change, used by import and export alike.

HF Linear weights are [out, in]; jaxlm's are [in, ...out] with heads split out:
  "transpose"   [out, in] <-> [in, out]                 (MLP, the head)
  "split_out"   [H*K, D]  <-> [D, H, K]                 (q/k/v projections)
  "split_in"    [D, H*K]  <-> [H, K, D]                 (o projection)
  "split"       [H*K]     <-> [H, K]                    (q/k/v biases)
  "same"                                                (embedding, norm gains)
Keys of block i are those of the anatomy's block_key(i). Only blocks whose MLP is SwiGLU
(ModelConfig.mlp = "swiglu") have Llama-family equivalents; others are refused.
"""

import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.anatomy import Anatomy
from jaxlm.model.config import ModelConfig

# (HF name, jaxlm path, layout), in transformers' order: before the blocks, a block, after.
BEFORE_BLOCKS = (("model.embed_tokens.weight", ("embed", "embedding"), "same"),)
BLOCK = (
    ("input_layernorm.weight", ("attention_norm", "scale"), "same"),
    ("self_attn.q_proj.weight", ("attention", "query"), "split_out"),
    ("self_attn.k_proj.weight", ("attention", "key"), "split_out"),
    ("self_attn.v_proj.weight", ("attention", "value"), "split_out"),
    ("self_attn.q_proj.bias", ("attention", "query_bias"), "split"),
    ("self_attn.k_proj.bias", ("attention", "key_bias"), "split"),
    ("self_attn.v_proj.bias", ("attention", "value_bias"), "split"),
    ("self_attn.o_proj.weight", ("attention", "out"), "split_in"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "same"),
    ("mlp.gate_proj.weight", ("mlp", "gate"), "transpose"),
    ("mlp.up_proj.weight", ("mlp", "up"), "transpose"),
    ("mlp.down_proj.weight", ("mlp", "down"), "transpose"),
)
AFTER_BLOCKS = (("model.norm.weight", ("final_norm", "scale"), "same"),
                ("lm_head.weight", ("lm_head",), "transpose"))
BLOCK_PREFIX = "model.layers.{}."
INTEROP_MLPS = ("swiglu",)


def check_interop(config: ModelConfig) -> None:
  if config.mlp not in INTEROP_MLPS:
    raise UserError(f"ModelConfig.mlp={config.mlp!r} has no Hugging Face Llama-family "
                    f"equivalent; jaxlm converts blocks whose MLP is one of {list(INTEROP_MLPS)}")


def tensor_names(parts: Anatomy) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF name, jaxlm path, layout) of every param of the model `parts` describes, in
  transformers' order. A tied head has no lm_head param: transformers re-ties it on load."""
  check_interop(parts.config)
  rows = list(BEFORE_BLOCKS)
  for i in range(parts.num_blocks):
    rows += [(BLOCK_PREFIX.format(i) + name, (parts.block_key(i), *path), layout)
             for name, path, layout in BLOCK]
  rows += AFTER_BLOCKS
  return [row for row in rows if parts.get(row[1]) is not None]


def locate(name: str, parts: Anatomy):
  """(jaxlm path, layout) of the HF tensor `name` (its path may be absent from the model: the
  caller says so), None for one to skip (the head of a tied model), or "unknown"."""
  check_interop(parts.config)
  for hf, path, layout in BEFORE_BLOCKS + AFTER_BLOCKS:
    if name == hf:
      return None if path == ("lm_head",) and parts.config.tie_embeddings else (path, layout)
  pieces = name.split(".")
  if len(pieces) < 5 or pieces[:2] != ["model", "layers"] or not pieces[2].isdigit():
    return "unknown"
  rest = ".".join(pieces[3:])
  for hf, path, layout in BLOCK:
    if rest == hf:
      return (parts.block_key(int(pieces[2])), *path), layout
  return "unknown"


def hf_shape(shape: tuple, layout: str) -> tuple:
  """The HF shape of a jaxlm param of `shape`."""
  if layout == "split_out":
    return (shape[1] * shape[2], shape[0])
  if layout == "split_in":
    return (shape[2], shape[0] * shape[1])
  if layout == "split":
    return (shape[0] * shape[1],)
  if layout == "transpose":
    return tuple(reversed(shape))
  return tuple(shape)


def to_jaxlm(value: np.ndarray, shape: tuple, layout: str) -> np.ndarray:
  """An HF tensor in jaxlm's layout of `shape`."""
  if layout in ("split_out", "split_in", "transpose"):
    value = value.T
  return np.ascontiguousarray(value.reshape(shape), dtype=np.float32)


def to_hf(value: np.ndarray, layout: str) -> np.ndarray:
  """A jaxlm param in Hugging Face's layout."""
  shape = hf_shape(value.shape, layout)
  if layout == "split_out":  # [D, H, K] -> [H*K, D]
    value = value.reshape(value.shape[0], -1).T
  elif layout == "split_in":  # [H, K, D] -> [D, H*K]
    value = value.reshape(-1, value.shape[-1]).T
  elif layout == "transpose":
    value = value.T
  return np.ascontiguousarray(value.reshape(shape), dtype=np.float32)
