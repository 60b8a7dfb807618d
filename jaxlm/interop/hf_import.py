"""Import a local Hugging Face Llama / Mistral / Qwen2 / Mixtral directory as jaxlm params,
streaming.

    config, params = import_hf("/models/TinyLlama-1.1B")   # float32 numpy arrays

Tensors are read one at a time from model.safetensors (or the shards that
model.safetensors.index.json names) and each is converted before the next is read, so the host
holds the output params plus one tensor (one stacked MoE param and one of its experts' tensors),
never a second copy of the checkpoint. Pickle checkpoints (pytorch_model.bin, *.pt) are refused,
never loaded: unpickling runs code.

Mapping (jaxlm.interop.names holds it as a table; HF tensor [shape] -> jaxlm param [shape]; D
model, H heads, G kv heads, K head_dim, F mlp, V vocab; HF Linear weights are [out, in],
jaxlm's are [in, ...out]):
  model.embed_tokens.weight [V, D]              -> embed/embedding [V, D]
  model.layers.i.input_layernorm.weight [D]     -> layer_i/attention_norm/scale [D]
  model.layers.i.self_attn.q_proj.weight [H*K, D] -> layer_i/attention/query [D, H, K]  (.T)
  model.layers.i.self_attn.k_proj.weight [G*K, D] -> layer_i/attention/key [D, G, K]    (.T)
  model.layers.i.self_attn.v_proj.weight [G*K, D] -> layer_i/attention/value [D, G, K]  (.T)
  model.layers.i.self_attn.{q,k,v}_proj.bias    -> layer_i/attention/{query,key,value}_bias
                                                   [H or G, K]  (Qwen2)
  model.layers.i.self_attn.o_proj.weight [D, H*K] -> layer_i/attention/out [H, K, D]    (.T)
  model.layers.i.post_attention_layernorm.weight -> layer_i/mlp_norm/scale [D]
  model.layers.i.mlp.gate_proj.weight [F, D]    -> layer_i/mlp/gate [D, F]  (.T)
  model.layers.i.mlp.up_proj.weight [F, D]      -> layer_i/mlp/up [D, F]    (.T)
  model.layers.i.mlp.down_proj.weight [D, F]    -> layer_i/mlp/down [F, D]  (.T)
  model.norm.weight [D]                         -> final_norm/scale [D]
  lm_head.weight [V, D]                         -> lm_head [D, V]  (.T; absent/ignored if tied)
Mixtral (E experts, F each expert's hidden units), in place of the mlp.* rows:
  model.layers.i.block_sparse_moe.gate.weight [E, D] -> layer_i/mlp/router [D, E]  (.T)
  model.layers.i.block_sparse_moe.experts.e.w1.weight [F, D] -> layer_i/mlp/gate[e] [D, F] (.T)
  model.layers.i.block_sparse_moe.experts.e.w3.weight [F, D] -> layer_i/mlp/up[e] [D, F]   (.T)
  model.layers.i.block_sparse_moe.experts.e.w2.weight [D, F] -> layer_i/mlp/down[e] [F, D] (.T)

RoPE: jaxlm rotates the half-split ("rotate_half") layout, pairing dimension j with j + K/2
(jaxlm.model.layers.apply_rope), which is exactly what transformers' Llama, Mistral, Qwen2 and
Mixtral modeling code does. The q_proj/k_proj rows of HF checkpoints are already in that
order (the conversion from Meta's interleaved layout permuted them once, in transformers'
convert_llama_weights_to_hf.py), so they are copied with no q/k permutation: a row-block of
q_proj is one head, and within a head row j is dimension j.
"""

import json
import os

import numpy as np

from jaxlm.errors import UserError
from jaxlm.interop.hf_config import load_hf_config
from jaxlm.interop.names import check_interop, hf_shape, locate, tensor_names, to_jaxlm
from jaxlm.model.anatomy import anatomy
from jaxlm.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some older checkpoints saved; jaxlm recomputes them from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _safetensors():
  try:
    import safetensors  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError('importing Hugging Face checkpoints needs safetensors: pip install -e ".[hf]"'
                    ) from None
  return safetensors


def checkpoint_files(model_dir: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it, through the index when there is one."""
  if not os.path.isdir(model_dir):
    raise UserError(f"{model_dir} is not a directory; give a Hugging Face model directory")
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map") or {}
    if not weight_map:
      raise UserError(f"{index_path} has no weight_map")
    for shard in sorted(set(weight_map.values())):
      if not os.path.exists(os.path.join(model_dir, shard)):
        raise UserError(f"{index_path} names the shard {shard}, which is missing from "
                        f"{model_dir}; download it again")
    return {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
  single = os.path.join(model_dir, SINGLE_FILE)
  if os.path.exists(single):
    with _safetensors().safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  pickles = sorted(n for n in os.listdir(model_dir) if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise UserError(f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}), which "
                    "jaxlm never loads (unpickling runs code); convert them to safetensors first, "
                    "e.g. model.save_pretrained(dir, safe_serialization=True) in transformers")
  raise UserError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


class HFParams:
  """The params of `config` in a Hugging Face directory, checked from the files' metadata alone
  (every tensor known, present, and of the shape config.json implies) and read one at a time:

      source = HFParams(model_dir, config)
      source.shapes                         # {("layer_0", "mlp", "up"): (D, F), ...}
      source.read(("layer_0", "mlp", "up"))  # one float32 numpy array in jaxlm's layout

  An MoE param [E, ...] is stacked from its E expert tensors, read one at a time into it: the
  host holds one stacked param and one expert's tensor.
  """

  def __init__(self, model_dir: str, config: ModelConfig):
    self.model_dir = model_dir
    check_interop(config)
    files = checkpoint_files(model_dir)
    self._parts = anatomy(config)
    self.shapes = {part.path: part.shape for part in self._parts}
    self._where: dict[tuple, dict] = {}  # path -> {expert index or None: (file, Row)}
    safetensors = _safetensors()
    for file in sorted(set(files.values())):
      with safetensors.safe_open(file, framework="numpy") as handle:
        for name in sorted(n for n, f in files.items() if f == file):
          self._add(file, name, tuple(handle.get_slice(name).get_shape()))
    wanted = tensor_names(self._parts)
    missing = [row for row in wanted if row.expert not in self._where.get(row.path, {})]
    if missing:
      raise UserError(f"{model_dir} lacks {len(missing)} of the {len(wanted)} tensors config.json "
                      f"implies, e.g. {missing[0].name} (for {'/'.join(missing[0].path)}); the "
                      "checkpoint is incomplete or config.json does not match it")

  def _add(self, file: str, name: str, shape: tuple) -> None:
    if name.endswith(IGNORED_SUFFIXES):
      return
    row = locate(name, self._parts)
    if row is None:
      return
    if row == "unknown":
      raise UserError(f"{os.path.basename(file)} holds the tensor {name}, which the mapping of "
                      "config.json's architecture does not know; is that architecture right?")
    have = self.shapes.get(row.path)
    if have is None or (row.expert is not None and row.expert >= have[0]):
      where = "/".join(row.path) if row.expert is None else (
          f"expert {row.expert} of {'/'.join(row.path)}")
      raise UserError(f"{name} has no place in the model config.json describes (no {where}); "
                      "config.json and the weights disagree")
    want = hf_shape(have, row.layout)
    if shape != want:
      raise UserError(f"{name} has shape {list(shape)} in {os.path.basename(file)}, but "
                      f"config.json implies {list(want)}; config and weights disagree")
    self._where.setdefault(row.path, {})[row.expert] = (file, row)

  def read(self, path: tuple) -> np.ndarray:
    pieces = self._where[path]
    if None in pieces:
      return self._read(path, *pieces[None])
    value = np.empty(self.shapes[path], np.float32)
    for expert in range(len(value)):
      value[expert] = self._read(path, *pieces[expert])
    return value

  def _read(self, path: tuple, file: str, row) -> np.ndarray:
    with _safetensors().safe_open(file, framework="numpy") as handle:
      value = _read_float32(handle, file, row.name)
    return to_jaxlm(value, self.shapes[path], row.layout)


def import_hf_params(model_dir: str, config: ModelConfig) -> dict:
  """The params of `config` (float32 numpy arrays, jaxlm's tree) from the directory's tensors."""
  source = HFParams(model_dir, config)
  params = {}
  for path in source.shapes:
    _set(params, path, source.read(path))
  return params


def _read_float32(handle, path: str, name: str) -> np.ndarray:
  """One tensor as float32. numpy has no bfloat16, which safetensors' numpy reader refuses;
  those go through torch (the hf extra), still one tensor at a time."""
  if handle.get_slice(name).get_dtype() == "BF16":
    import torch  # pylint: disable=import-outside-toplevel
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="pt") as f:
      return f.get_tensor(name).to(torch.float32).numpy()
  return handle.get_tensor(name).astype(np.float32, copy=False)


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def import_hf(model_dir: str, **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, float32 params) of a local Hugging Face model directory."""
  config = load_hf_config(model_dir, **config_overrides)
  return config, import_hf_params(model_dir, config)
