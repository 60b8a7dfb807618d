"""Export jaxlm params as a Hugging Face Llama / Qwen2 / Mixtral directory, one output shard at
a time.

    export_hf(params, config, "/tmp/hf", tokenizer=run.tokenizer, max_shard_bytes=2 << 30)
    transformers.AutoModelForCausalLM.from_pretrained("/tmp/hf")

The exact inverse of hf_import's mapping (see its docstring, and its RoPE statement: jaxlm and
transformers both use the half-split layout, so no q/k permutation either way). Shards are
planned from the params' shapes alone; then each shard's tensors are converted (one jaxlm leaf
at a time, float32) and written before the next shard's are made, so the host holds the params
plus at most one shard and one param (an MoE param [E, ...] is read once and written as its E
expert tensors), never a second copy of the model. `params` may hold numpy or jax arrays.
"""

import json
import os

import numpy as np

from jaxlm.errors import UserError
from jaxlm.interop.hf_config import MIXTRAL, MODEL_TYPES, router_aux_loss_coef
from jaxlm.interop.hf_import import INDEX_FILE, SINGLE_FILE, _safetensors
from jaxlm.interop.names import Row, check_interop, hf_shape, tensor_names, to_hf
from jaxlm.model.anatomy import anatomy
from jaxlm.model.config import ModelConfig

DEFAULT_SHARD_BYTES = 2 << 30
TOKENIZER_FILE = "tokenizer.json"


def hf_config_dict(config: ModelConfig) -> dict:
  """config.json for `config`: LlamaForCausalLM, Qwen2ForCausalLM when it has q/k/v biases
  (Llama's attention_bias would also put one on o_proj), or MixtralForCausalLM when every block
  is an MoE layer (intermediate_size is then each expert's). Rotary settings in the Hub format
  (rope_theta, rope_scaling), which transformers 4 and 5 both read."""
  check_interop(config)
  moe, qwen = bool(config.moe_blocks), config.attention_bias
  arch = MIXTRAL if moe else "Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"
  hf = {
      "architectures": [arch], "model_type": MODEL_TYPES[arch],
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.resolved_head_dim,
      "intermediate_size": config.resolved_expert_mlp_dim if moe else config.mlp_dim,
      "max_position_embeddings": config.max_seq_len,
      "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
      "rope_scaling": None, "tie_word_embeddings": config.tie_embeddings,
      "initializer_range": config.init_std, "torch_dtype": "float32", "use_cache": True,
  }
  if moe:  # Mixtral drops no token: jaxlm's dropless path (the capacity path's where none drop).
    hf.update(sliding_window=None, num_local_experts=config.num_experts,
              num_experts_per_tok=config.experts_per_token,
              router_aux_loss_coef=router_aux_loss_coef(config), router_jitter_noise=0.0,
              output_router_logits=False)
  elif qwen:
    hf.update(use_sliding_window=False, sliding_window=None)  # jaxlm attends to every prefix.
  else:
    hf.update(attention_bias=False, mlp_bias=False)
  if config.rope_scaling == "llama3":
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": config.rope_scaling_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_len}
  elif config.rope_scaling is not None:
    raise UserError(f"ModelConfig.rope_scaling={config.rope_scaling!r} has no Hugging Face "
                    "equivalent jaxlm exports (only 'llama3' and None)")
  return hf


def hf_tensors(config: ModelConfig) -> list[tuple[Row, tuple]]:
  """(Row, HF shape) of every tensor, in transformers' order (jaxlm.interop.names)."""
  parts = anatomy(config)
  return [(row, hf_shape(parts[row.path].shape, row.layout)) for row in tensor_names(parts)]


def _leaf(params, path: tuple):
  node = params
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise UserError(f"the params have no {'/'.join(path)}, which the model config implies; "
                      "params and config disagree")
    node = node[key]
  return node


def plan_shards(tensors, max_shard_bytes: int) -> list[list]:
  """Consecutive tensors grouped so each shard stays within max_shard_bytes (float32); a tensor
  larger than that is a shard of its own."""
  shards, size = [[]], 0
  for tensor in tensors:
    nbytes = 4 * int(np.prod(tensor[1]))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  return shards


def export_hf(params, config: ModelConfig, out_dir: str, tokenizer=None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Write config.json, the safetensors shards (and model.safetensors.index.json when there is
  more than one) and, for a Hugging Face tokenizer, tokenizer.json. Returns the files written."""
  if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
    raise UserError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
  if config.parameterization != "dense":
    raise UserError(f"Hugging Face files hold dense matrices, but this model's are "
                    f"{config.parameterization} factors; train a dense stage after it (its "
                    "hand-over Stage.transition = [@sltrain_to_dense]) and export that run")
  os.makedirs(out_dir, exist_ok=True)
  clash = sorted(n for n in os.listdir(out_dir)
                 if n == "config.json" or n.endswith(".safetensors") or n == INDEX_FILE)
  if clash:
    raise UserError(f"{out_dir} already holds {', '.join(clash)}; export into an empty directory "
                    "(stale shards would mix with the new ones)")
  hf_config = hf_config_dict(config)
  tensors = hf_tensors(config)
  for row, shape_there in tensors:  # Check every shape before writing anything.
    shape = tuple(np.shape(_leaf(params, row.path)))
    if row.expert is not None:
      shape = shape[1:]
    if int(np.prod(shape)) != int(np.prod(shape_there)):
      raise UserError(f"{'/'.join(row.path)} has shape {list(shape)}, but the model config "
                      f"implies {row.name} {list(shape_there)}; params and config disagree")
  save_file = _safetensors_numpy().save_file
  shards = plan_shards(tensors, max_shard_bytes)
  written, weight_map, total = [], {}, 0
  path, leaf = None, None  # The param being written, kept while its experts are.
  for i, shard in enumerate(shards):
    filename = (SINGLE_FILE if len(shards) == 1 else
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    block = {}
    for row, _ in shard:  # device_get one leaf at a time (jax or numpy arrays).
      if row.path != path:
        path, leaf = row.path, None  # Frees the last leaf before the next is read.
        leaf = np.asarray(_leaf(params, path))
      block[row.name] = to_hf(leaf, row.layout, row.expert)
      weight_map[row.name] = filename
      total += block[row.name].nbytes
    save_file(block, os.path.join(out_dir, filename), metadata={"format": "pt"})
    del block  # This shard is on disk before the next one is made.
    written.append(filename)
  if len(shards) > 1:
    _write_json(os.path.join(out_dir, INDEX_FILE),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    written.append(INDEX_FILE)
  tokenizer_files, special_ids = _write_tokenizer(tokenizer, out_dir)
  _write_json(os.path.join(out_dir, "config.json"), {**hf_config, **special_ids})
  return written + ["config.json"] + tokenizer_files


def _safetensors_numpy():
  _safetensors()  # The clear message when the hf extra is absent.
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  return safetensors.numpy


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _write_tokenizer(tokenizer, out_dir: str) -> tuple[list[str], dict]:
  """tokenizer.json and tokenizer_config.json from a HuggingFaceTokenizer (its loaded bytes and
  special tokens) or a path to a tokenizer.json; other tokenizers (bytes, SentencePiece) have no
  tokenizer.json and are left out. Returns the files and the special ids for config.json."""
  if tokenizer is None:
    return [], {}
  specials = {}
  if isinstance(tokenizer, (str, os.PathLike)):
    try:
      with open(tokenizer, "rb") as f:
        data = f.read()
    except OSError as e:
      raise UserError(f"cannot read the tokenizer {str(tokenizer)!r} ({e.strerror})") from None
  else:
    data = getattr(tokenizer, "_json", None)
    if data is None:
      return [], {}
    specials = {f"{kind}_token": tokenizer.id_to_token(getattr(tokenizer, f"{kind}_id"))
                for kind in ("bos", "eos", "pad")}
  with open(os.path.join(out_dir, TOKENIZER_FILE), "wb") as f:
    f.write(data)
  # Without a tokenizer class, AutoTokenizer would guess one from model_type.
  _write_json(os.path.join(out_dir, "tokenizer_config.json"),
              {"tokenizer_class": "PreTrainedTokenizerFast", **specials})
  ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_id")
         for kind in ("bos", "eos", "pad")} if specials else {}
  return [TOKENIZER_FILE, "tokenizer_config.json"], ids
