"""The attention implementations beyond the XLA reference, and the choice behind 'auto'.

  pallas  our flash-attention kernel (`flash_attention`); runs in interpret mode on CPU
  cudnn   cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs)
  splash  JAX's TPU splash attention, which skips fully masked tiles (TPUs)

All take `fn(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal)`, so `ModelConfig.attention_impl`
switches between them with no change to the model. `choose_attention_impl` names what 'auto'
runs: TPU -> splash, GPU -> cudnn when it fits else pallas, CPU -> xla_blocked (causal blocks in
plain XLA, in the model). The model's dispatch table (`ATTENTION_IMPLS` in model/attention.py)
names these functions and imports this module the first time one is asked for; this module never
imports the model (the shared mask is in `jaxlm.masking`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxlm.errors import UserError
from jaxlm.kernels.flash_attention import FlashBlockSizes, flash_attention
from jaxlm.masking import attention_mask

# cuDNN takes document masks only as a dense [B, 1, L, S] bias (and JAX also returns its
# gradient), so its memory grows as L². 'auto' prefers our kernel beyond this length. A guess
# to be replaced by measurements from tools/bench_attention.py on a GPU.
CUDNN_AUTO_MAX_LENGTH = 4096


def _require_backend(impl: str, backend: str, hardware: str) -> None:
  if jax.default_backend() != backend:
    raise UserError(f"attention_impl={impl!r} needs {hardware} (this process runs on "
                    f"{jax.default_backend()}); use 'auto' or 'xla'")


def pallas_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True):
  """Our Pallas kernel with gin-configured `FlashBlockSizes`; interpret mode on CPU."""
  return flash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=causal,
                         block_sizes=FlashBlockSizes())


def cudnn_limitation(q_BLHK) -> str | None:
  """Why cuDNN's flash attention cannot take these inputs, or None if it can."""
  if q_BLHK.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q_BLHK.dtype} (it takes bfloat16 or float16)"
  head_dim = q_BLHK.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return f"head_dim {head_dim} (it takes multiples of 8 up to 128)"
  if q_BLHK.shape[1] % 2:
    return f"odd sequence length {q_BLHK.shape[1]} (with a mask it needs an even length)"
  return None


def cudnn_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True):
  """cuDNN flash attention; GQA is native, documents are a dense boolean mask (see above)."""
  _require_backend("cudnn", "gpu", "an NVIDIA GPU")
  if problem := cudnn_limitation(q_BLHK):
    raise UserError(f"attention_impl='cudnn' cannot take {problem}; use 'pallas' or 'auto'")
  same_doc_B1LS = attention_mask(segment_ids_BL, segment_ids_BL, causal=False)[:, None]
  return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=same_doc_B1LS,
                                      is_causal=causal, implementation="cudnn")


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, num_heads: int, causal: bool, interpret: bool):
  # Building the kernel turns the mask into block-sparsity tables (numpy work): do it once.
  block = math.gcd(length, 512)  # The largest of 128, 256, 512 dividing the length.
  mask = (splash.CausalMask((length, length)) if causal else
          splash.FullMask((length, length)))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha_single_device(
      splash.MultiHeadMask([mask] * num_heads), block_sizes=sizes, interpret=interpret)


def splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True,
                     interpret: bool = False):
  """JAX's splash attention (TPU). It takes [heads, length, dim] per example and leaves the
  1/√d scaling to the caller; GQA maps onto its grouped heads directly."""
  if not interpret:
    _require_backend("splash", "tpu", "a TPU")
  b, l, h, d = q_BLHK.shape
  if l % 128:
    raise UserError(f"attention_impl='splash' needs a sequence length divisible by 128, got "
                    f"{l}; use 'pallas' or 'auto'")
  kernel = _splash_kernel(l, h, causal, interpret)
  q_BHLK = (q_BLHK.astype(jnp.float32) * d ** -0.5).astype(q_BLHK.dtype).transpose(0, 2, 1, 3)
  per_example = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))
  out_BHLK = jax.vmap(per_example)(q_BHLK, k_BSGK.transpose(0, 2, 1, 3),
                                   v_BSGK.transpose(0, 2, 1, 3), segment_ids_BL.astype(jnp.int32))
  return out_BHLK.transpose(0, 2, 1, 3)


def choose_attention_impl(q_BLHK) -> str:
  """What 'auto' runs for these inputs on this backend: a name in the model's dispatch table."""
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash" if q_BLHK.shape[1] % 128 == 0 else "pallas"
  if backend == "gpu":
    usable = cudnn_limitation(q_BLHK) is None and q_BLHK.shape[1] <= CUDNN_AUTO_MAX_LENGTH
    return "cudnn" if usable else "pallas"
  return "xla_blocked"  # Interpret-mode kernels on CPU are for testing, far slower than XLA.
