"""A Hugging Face config.json of the Llama family or Mixtral -> ModelConfig, and a gin model
file for it.

Reads both ways rotary settings are written: transformers 5's `rope_parameters` (theta and
scaling inside), and the Hub's top-level `rope_theta` with `rope_scaling` (keyed `type` or
`rope_type`). Anything jaxlm's decoder would compute differently is refused, never approximated.

Mixtral's balancing coefficient: transformers' loss is coef x E sum_i F_i P_i with F and P
pooled over all layers (F_i: a token's choices of expert i, summing to k); jaxlm's is
weight x E sum_i f_i P_i in each of the L layers (f_i summing to 1). With weight = coef x k / L
they are equal whenever every layer routes alike; no coefficient makes them equal otherwise
(docs/interop.md).
"""

import json
import os

import gin

from jaxlm.errors import UserError
from jaxlm.model.config import MOE_FIELDS, ModelConfig

# One decoder (RMSNorm, rotary, GQA, SwiGLU) under three names, each with its model_type; what
# differs is in the config. Mixtral is that decoder with an MoE layer for every block's MLP.
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}
ARCHITECTURES = tuple(MODEL_TYPES)
MIXTRAL = "MixtralForCausalLM"
# transformers' MixtralConfig defaults, for a config.json that leaves a field out (its theta,
# epsilon and context differ from the fallbacks below, which are Llama's).
MIXTRAL_DEFAULTS = dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072,
                        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001)
# Fields that describe the network; a gin model file sets these (dtype, remat... are the run's).
GIN_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_seq_len", "rope_theta", "rope_scaling", "rope_scaling_factor",
              "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
              "attention_bias", "tie_embeddings", "norm_eps", "moe_layers", *MOE_FIELDS)

LLAMA3_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                         "rope_original_max_len")


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} does not exist; a Hugging Face model directory needs config.json "
                    "next to its *.safetensors") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None


def _rope(hf: dict) -> tuple[float, dict | None]:
  """(theta, the scaling dict or None) from either config format."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5.
    theta, scaling = params["rope_theta"], params
  else:
    theta, scaling = hf.get("rope_theta", 10_000.0), hf.get("rope_scaling")
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
      scaling = None
    elif kind != "llama3":
      raise UserError(f"config.json rope scaling type {kind!r} is not supported (only 'llama3' "
                      "and none); jaxlm would compute different rotary angles")
    if scaling is not None:
      scaling = dict(scaling)
    if (scaling or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
      raise UserError("config.json partial_rotary_factor != 1 is not supported; jaxlm rotates "
                      "the whole head")
  return float(theta), scaling


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """The ModelConfig of a parsed config.json; `overrides` (e.g. dtype, remat) are passed through.

  Mistral's and Mixtral's (and Qwen2's, when used) sliding window: jaxlm attends to the whole
  causal prefix. That equals sliding-window attention for every sequence no longer than the
  window, so the model is imported with max_seq_len = min(max_position_embeddings,
  sliding_window): exact, at the cost of context beyond the window (Mistral 7B v0.1: 4096 of
  32768). Refusing instead would reject the model family; approximating would be silently wrong
  past the window."""
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise UserError(f"config.json architectures={archs}; jaxlm imports exactly one of "
                    f"{list(ARCHITECTURES)}")
  arch = archs[0]
  if arch == MIXTRAL:
    hf = {**MIXTRAL_DEFAULTS, **hf}
  if hf.get("model_type") != MODEL_TYPES[arch]:
    # transformers builds the model from model_type: another one is another network.
    raise UserError(f"config.json model_type={hf.get('model_type')!r} with architectures={archs}; "
                    f"jaxlm imports model_type {sorted(set(MODEL_TYPES.values()))} with its "
                    "own architecture")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"config.json hidden_act={hf['hidden_act']!r}; jaxlm's MLP is SwiGLU (silu)")
  if hf.get("mlp_bias"):
    raise UserError("config.json mlp_bias=true is not supported; jaxlm's MLP has no biases")
  if arch == "Qwen2ForCausalLM":
    attention_bias = True  # Qwen2 always has q/k/v biases and none on o_proj.
  elif hf.get("attention_bias"):  # Llama's flag also puts a bias on o_proj, which jaxlm lacks.
    raise UserError("config.json attention_bias=true (with an o_proj bias) is not supported for "
                    f"{arch}")
  else:
    attention_bias = False
  theta, scaling = _rope(hf)
  d_model, num_heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d_model // num_heads
  max_seq_len = hf.get("max_position_embeddings", 2048)
  window = hf.get("sliding_window")
  if arch == "Qwen2ForCausalLM" and not (hf.get("use_sliding_window") or
                                         "sliding_attention" in (hf.get("layer_types") or ())):
    window = None  # Qwen2 writes a window it does not use unless use_sliding_window is set.
  if window is not None:
    max_seq_len = min(max_seq_len, window)
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=d_model, num_layers=hf["num_hidden_layers"],
      num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=None if head_dim * num_heads == d_model else head_dim,
      mlp_dim=hf["intermediate_size"], max_seq_len=max_seq_len, rope_theta=theta,
      attention_bias=attention_bias,
      # The three architectures default to untied (their config classes say so).
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
  if scaling is not None:
    fields.update(
        rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_len=int(scaling.get("original_max_position_embeddings")
                                  or hf.get("max_position_embeddings")))
  if arch == MIXTRAL:
    fields.update(_moe_fields(hf))
  return ModelConfig(**{**fields, **overrides})


def _moe_fields(hf: dict) -> dict:
  """Mixtral's MoE layers: one in every block; transformers' router (softmax, top k,
  renormalised: softmax over the k chosen logits) and dispatch (no token dropped); its
  balancing coefficient converted (module docstring); no z-loss (Mixtral has none)."""
  if hf.get("router_jitter_noise"):
    # Noise only in training: logits agree, but a run continued in jaxlm would train without it.
    raise UserError(f"config.json router_jitter_noise={hf['router_jitter_noise']} is not "
                    "supported (jaxlm's router adds no training noise); set it to 0 in "
                    "config.json to import the weights without it")
  k = hf["num_experts_per_tok"]
  weight = float(hf["router_aux_loss_coef"]) * k / hf["num_hidden_layers"]
  return dict(moe_layers="all", num_experts=hf["num_local_experts"], experts_per_token=k,
              router="topk_softmax", moe_dispatch="dropless", load_balancing_weight=weight,
              router_z_loss_weight=0.0)


def router_aux_loss_coef(config: ModelConfig) -> float:
  """Mixtral's router_aux_loss_coef for `config`'s balancing weight (module docstring), to 15
  significant digits so that a coefficient converted both ways reads as it was written."""
  coef = config.load_balancing_weight * config.num_layers / config.experts_per_token
  return float(f"{coef:.15g}")


def load_hf_config(model_dir: str, **overrides) -> ModelConfig:
  return model_config_from_hf(read_json(os.path.join(model_dir, "config.json")), **overrides)


@gin.configurable
def hf_model_config(path: str = gin.REQUIRED) -> ModelConfig:
  """`Stage.model = @hf_model_config()`: the architecture of a Hugging Face directory's
  config.json; the rest (dtype, remat, attention kernel...) from the run's ModelConfig bindings."""
  return load_hf_config(path)


def gin_model_text(config: ModelConfig, source: str = "") -> str:
  """A gin model file (like gin/models/*.gin) binding every architectural field of `config`."""
  lines = [f"# Imported from the Hugging Face model {source}." if source else
           "# Imported from a Hugging Face model."]
  for name in GIN_FIELDS:
    if name in LLAMA3_SCALING_FIELDS and config.rope_scaling != "llama3":
      continue  # Only what applies: these factors mean nothing without llama3 scaling.
    if name in ("moe_layers", *MOE_FIELDS) and not config.moe_blocks:
      continue  # Nor the MoE fields in a dense model (ModelConfig refuses them there).
    lines.append(f"ModelConfig.{name} = {getattr(config, name)!r}")
  return "\n".join(lines) + "\n"


def write_gin_model_file(config: ModelConfig, path: str, source: str = "") -> None:
  with open(path, "w") as f:
    f.write(gin_model_text(config, source))
