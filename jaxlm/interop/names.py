"""The one table between Hugging Face tensor names (Llama, Mistral, Qwen2, Mixtral) and jaxlm
params, with each tensor's layout change, used by import and export alike.

HF Linear weights are [out, in]; jaxlm's are [in, ...out] with heads split out:
  "transpose"   [out, in] <-> [in, out]                 (MLP, the head, the MoE router)
  "split_out"   [H*K, D]  <-> [D, H, K]                 (q/k/v projections)
  "split_in"    [D, H*K]  <-> [H, K, D]                 (o projection)
  "split"       [H*K]     <-> [H, K]                    (q/k/v biases)
  "expert"      E x [out, in] <-> [E, in, out]          (Mixtral's experts: one HF tensor each)
  "same"                                                (embedding, norm gains)
Keys of block i are those of the anatomy's block_key(i). A block's MLP is SwiGLU
(ModelConfig.mlp = "swiglu": Llama, Mistral, Qwen2) or, in every block, an MoE layer
(moe_layers = "all", router "topk_softmax": Mixtral, whose experts.{e}.w1 / w3 / w2 are expert
e's gate, up and down, stacked into jaxlm's [E, ...] arrays on import and split on export);
others are refused. transformers 5 fuses each block's experts in memory (mlp.experts.gate_up_proj
[E, 2F, D], down_proj), but its save_pretrained writes the Hub's per-expert names, as
transformers 4 did, and its conversion mapping fuses them on load (checked with 5.25). The fused
names, written only with save_pretrained(save_original_format=False), are refused in one line
that says how to re-save.
"""

import re
from typing import NamedTuple

import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.anatomy import Anatomy
from jaxlm.model.config import ModelConfig

# (HF name, jaxlm path, layout), in transformers' order: before the blocks, a block, after.
BEFORE_BLOCKS = (("model.embed_tokens.weight", ("embed", "embedding"), "same"),)
BLOCK_ATTENTION = (
    ("input_layernorm.weight", ("attention_norm", "scale"), "same"),
    ("self_attn.q_proj.weight", ("attention", "query"), "split_out"),
    ("self_attn.k_proj.weight", ("attention", "key"), "split_out"),
    ("self_attn.v_proj.weight", ("attention", "value"), "split_out"),
    ("self_attn.q_proj.bias", ("attention", "query_bias"), "split"),
    ("self_attn.k_proj.bias", ("attention", "key_bias"), "split"),
    ("self_attn.v_proj.bias", ("attention", "value_bias"), "split"),
    ("self_attn.o_proj.weight", ("attention", "out"), "split_in"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "same"),
)
DENSE_MLP = (
    ("mlp.gate_proj.weight", ("mlp", "gate"), "transpose"),
    ("mlp.up_proj.weight", ("mlp", "up"), "transpose"),
    ("mlp.down_proj.weight", ("mlp", "down"), "transpose"),
)
# Mixtral's router and experts, as the Hub's checkpoints name them; "{}" is the expert index.
MOE_MLP = (
    ("block_sparse_moe.gate.weight", ("mlp", "router"), "transpose"),
    ("block_sparse_moe.experts.{}.w1.weight", ("mlp", "gate"), "expert"),
    ("block_sparse_moe.experts.{}.w3.weight", ("mlp", "up"), "expert"),
    ("block_sparse_moe.experts.{}.w2.weight", ("mlp", "down"), "expert"),
)
AFTER_BLOCKS = (("model.norm.weight", ("final_norm", "scale"), "same"),
                ("lm_head.weight", ("lm_head",), "transpose"))
BLOCK_PREFIX = "model.layers.{}."
# transformers 5's in-memory names of Mixtral's router and fused experts ([E, 2F, D], [E, D, F]).
FUSED_MOE = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
INTEROP_MLPS = ("swiglu",)
_EXPERT = re.compile(r"(?<=\.experts\.)\d+(?=\.)")


class Row(NamedTuple):
  """One HF tensor: the jaxlm param it is (with `expert`, that expert's slice of it) and how
  its layout changes."""
  name: str
  path: tuple[str, ...]
  layout: str
  expert: int | None = None


def check_interop(config: ModelConfig) -> None:
  """Refuses, in one line, a model that no architecture jaxlm converts can express."""
  moe = config.moe_blocks
  if moe and len(moe) < config.num_layers:
    raise UserError(f"ModelConfig.moe_layers={config.moe_layers!r} makes only some blocks MoE "
                    "layers, which no Hugging Face architecture jaxlm converts expresses "
                    "(Mixtral has one in every block, the Llama family none); use 'all' or ()")
  if not moe and config.mlp not in INTEROP_MLPS:
    raise UserError(f"ModelConfig.mlp={config.mlp!r} has no Hugging Face Llama-family "
                    f"equivalent; jaxlm converts blocks whose MLP is one of {list(INTEROP_MLPS)}")
  if moe and config.router != "topk_softmax":
    raise UserError(f"ModelConfig.router={config.router!r} has no Mixtral equivalent: Mixtral "
                    "renormalises the weights of the k chosen experts (router='topk_softmax')")
  if moe and config.attention_bias:
    raise UserError("ModelConfig.attention_bias=True (q/k/v biases) has no Mixtral equivalent; "
                    "Mixtral's attention has no biases")


def block_rows(config: ModelConfig) -> tuple:
  """Every block's rows (check_interop leaves only models whose blocks are all alike)."""
  return BLOCK_ATTENTION + (MOE_MLP if config.moe_blocks else DENSE_MLP)


def tensor_names(parts: Anatomy) -> list[Row]:
  """Every HF tensor of the model `parts` describes, in transformers' order (a param's experts
  one after another). A tied head has no lm_head param: transformers re-ties it on load."""
  check_interop(parts.config)
  rows = [Row(*row) for row in BEFORE_BLOCKS]
  for i in range(parts.num_blocks):
    for name, path, layout in block_rows(parts.config):
      full, path = BLOCK_PREFIX.format(i) + name, (parts.block_key(i), *path)
      if layout == "expert":
        rows += [Row(full.format(e), path, layout, e) for e in range(parts.config.num_experts)]
      else:
        rows.append(Row(full, path, layout))
  rows += [Row(*row) for row in AFTER_BLOCKS]
  return [row for row in rows if parts.get(row.path) is not None]


def locate(name: str, parts: Anatomy):
  """The Row of the HF tensor `name` (its path, or expert, may be absent from the model: the
  caller says so), None for one to skip (the head of a tied model), or "unknown"."""
  check_interop(parts.config)
  for hf, path, layout in BEFORE_BLOCKS + AFTER_BLOCKS:
    if name == hf:
      return None if path == ("lm_head",) and parts.config.tie_embeddings else Row(
          name, path, layout)
  pieces = name.split(".")
  if len(pieces) < 5 or pieces[:2] != ["model", "layers"] or not pieces[2].isdigit():
    return "unknown"
  rest = ".".join(pieces[3:])
  if rest in FUSED_MOE:
    raise UserError(f"{name} is transformers 5's fused in-memory layout of Mixtral (what "
                    "save_pretrained writes with save_original_format=False); re-save the model "
                    "with the default save_original_format=True, which writes the Hub's "
                    "per-expert block_sparse_moe.experts.{e}.w1/w2/w3")
  expert = _EXPERT.search(rest)
  generic = _EXPERT.sub("{}", rest, count=1)
  for hf, path, layout in block_rows(parts.config):
    if generic == hf:
      return Row(name, (parts.block_key(int(pieces[2])), *path), layout,
                 int(expert.group()) if expert else None)
  return "unknown"


def hf_shape(shape: tuple, layout: str) -> tuple:
  """The HF shape of a jaxlm param of `shape` (of one of its experts for "expert")."""
  if layout == "split_out":
    return (shape[1] * shape[2], shape[0])
  if layout == "split_in":
    return (shape[2], shape[0] * shape[1])
  if layout == "split":
    return (shape[0] * shape[1],)
  if layout == "transpose":
    return tuple(reversed(shape))
  if layout == "expert":
    return tuple(reversed(shape[1:]))
  return tuple(shape)


def to_jaxlm(value: np.ndarray, shape: tuple, layout: str) -> np.ndarray:
  """An HF tensor in jaxlm's layout of `shape` (for "expert": one expert's slice of it)."""
  if layout == "expert":
    return to_jaxlm(value, shape[1:], "transpose")
  if layout in ("split_out", "split_in", "transpose"):
    value = value.T
  return np.ascontiguousarray(value.reshape(shape), dtype=np.float32)


def to_hf(value: np.ndarray, layout: str, expert: int | None = None) -> np.ndarray:
  """A jaxlm param (for "expert": its slice `expert`) in Hugging Face's layout."""
  if layout == "expert":
    return to_hf(value[expert], "transpose")
  shape = hf_shape(value.shape, layout)
  if layout == "split_out":  # [D, H, K] -> [H*K, D]
    value = value.reshape(value.shape[0], -1).T
  elif layout == "split_in":  # [H, K, D] -> [D, H*K]
    value = value.reshape(-1, value.shape[-1]).T
  elif layout == "transpose":
    value = value.T
  return np.ascontiguousarray(value.reshape(shape), dtype=np.float32)
