"""Flash attention in Pallas: softmax(QKᵀ/√d + mask)V without the [L, S] attention matrix.

    out_BLHK = flash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=True)

FlashAttention (Dao et al. 2022, 2205.14135) tiles Q and K/V into blocks and streams them through
an online softmax, so memory is O(L) and the matrix never leaves on-chip memory; the backward
pass (a `jax.custom_vjp`) recomputes each tile from the saved per-row logsumexp instead of
storing probabilities (FlashAttention-2, 2307.08691). Supports causal masking, grouped-query
attention (KV head = query head // group, read in place, never repeated), packed documents
(attention only within equal segment ids), float32 / bfloat16 / float16 inputs.

Lowerings: `flash_attention_gpu` (Triton: one program per block, loop inside) and
`flash_attention_tpu` (Mosaic: the loop is a sequential grid axis with VMEM scratch); both share
the tile arithmetic in `flash_tiles`. On CPU, or when the requested lowering is not the local
backend, the kernels run with `interpret=True` (slow, exact: for tests).

Lengths that are not a multiple of the blocks are padded, not refused: the sequence is padded to
a common multiple of the block sizes, padded keys are masked by position, padded query rows are
sliced off (their zero cotangent adds nothing to dK/dV). Costs at most one extra block.

Rows with no visible key (impossible in causal or full self-attention, where every token sees
itself) give finite values that may differ from the XLA reference's uniform average.
"""

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.kernels import flash_attention_gpu, flash_attention_tpu
from jaxlm.validation import check_field_types, check_range

LOWERINGS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}

# (block_q, block_k, block_q_bwd, block_k_bwd). GPU: 128x64 forward tiles keep the [128, D]
# accumulator in registers for D <= 128; 64x64 in the backward, which holds two accumulators.
# TPU: large tiles amortise the ~0.35 us per-grid-step overhead; 128 is the lane width.
DEFAULT_BLOCKS = {"gpu": (128, 64, 64, 64), "tpu": (512, 512, 512, 512)}
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
  """Tile sizes of the Pallas flash-attention kernels; None picks the lowering's default.

  Forward tiles are [block_q, D] x [block_k, D]; the two backward kernels use (block_q_bwd,
  block_k_bwd). Blocks larger than the sequence shrink to fit it. GPU (Triton) blocks must be
  powers of two >= 16; TPU (Mosaic) blocks multiples of 128 (any size in interpret mode).
  """
  block_q: int | None = None
  block_k: int | None = None
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None

  def __post_init__(self):
    check_field_types(self)
    for field in dataclasses.fields(self):
      check_range(f"FlashBlockSizes.{field.name}", getattr(self, field.name), low=1,
                  integer=True, optional=True)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """Everything static about one call: lowering, masking, sizes. Hashable, so jit caches on it."""
  lowering: str
  interpret: bool
  causal: bool
  scale: float
  length: int
  padded_length: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int

  @property
  def kv_len_if_padded(self) -> int | None:
    """The true length when keys were padded (kernels then mask by position), else None."""
    return self.length if self.padded_length > self.length else None

  def num_kv_blocks(self, block_k: int) -> int:
    """Key blocks holding at least one real key; blocks of pure padding are never visited."""
    return -(-self.length // block_k)

  def num_q_blocks(self, block_q: int) -> int:
    return -(-self.length // block_q)


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _fit_block(name: str, block: int, length: int, lowering: str, interpret: bool) -> int:
  """Check a block size against the lowering's tiling rules and shrink it to the sequence."""
  if lowering == "gpu":
    if block < 16 or block & (block - 1):
      raise UserError(f"FlashBlockSizes.{name}={block}: Triton tiles must be powers of two "
                      ">= 16 (e.g. 64 or 128)")
    return min(block, _next_power_of_2(max(length, 16)))
  align = 8 if interpret else 128
  if block < align or block % align:
    raise UserError(f"FlashBlockSizes.{name}={block}: TPU tiles must be multiples of {align} "
                    "(e.g. 512)")
  return min(block, -(-length // align) * align)


def make_plan(length: int, head_dim: int, *, causal: bool, block_sizes: FlashBlockSizes,
              lowering: str, interpret: bool) -> KernelPlan:
  defaults = DEFAULT_BLOCKS[lowering]
  names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
  blocks = [_fit_block(name, getattr(block_sizes, name) or default, length, lowering, interpret)
            for name, default in zip(names, defaults)]
  multiple = math.lcm(*blocks)
  return KernelPlan(lowering=lowering, interpret=interpret, causal=causal,
                    scale=head_dim ** -0.5, length=length,
                    padded_length=-(-length // multiple) * multiple, **dict(zip(names, blocks)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, plan: KernelPlan):
  return LOWERINGS[plan.lowering].forward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, plan)[0]


def _flash_forward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, plan):
  out_BLHK, lse_BHL = LOWERINGS[plan.lowering].forward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL,
                                                       plan)
  # Residuals are O(L): inputs, output, and one float32 logsumexp per row — no probabilities.
  return out_BLHK, (q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, out_BLHK, lse_BHL)


def _flash_backward(plan, residuals, do_BLHK):
  q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, out_BLHK, lse_BHL = residuals
  # delta = rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's correction term, computed
  # once per row here rather than per tile in the kernels.
  delta_BHL = jnp.einsum("blhk,blhk->bhl", do_BLHK.astype(jnp.float32),
                         out_BLHK.astype(jnp.float32))
  dq, dk, dv = LOWERINGS[plan.lowering].backward(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, lse_BHL,
                                                 delta_BHL, do_BLHK, plan)
  return dq, dk, dv, None  # Segment ids are integers: no cotangent.


_flash.defvjp(_flash_forward, _flash_backward)


def default_lowering() -> str:
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def flash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool = True,
                    block_sizes: FlashBlockSizes | None = None, lowering: str | None = None,
                    interpret: bool | None = None):
  """Grouped-query self-attention with document masking, as `xla_attention` computes it.

  q [B, L, H, D]; k, v [B, L, G, D] with H % G == 0; segment_ids [B, L] int (attention only
  between equal ids). `lowering` is "gpu" or "tpu" (default: the local backend's, "gpu" on CPU);
  `interpret` defaults to True unless the lowering matches the local backend.
  """
  b, l, h, d = q_BLHK.shape
  if k_BSGK.shape != v_BSGK.shape or k_BSGK.shape[:2] != (b, l) or k_BSGK.shape[3] != d:
    raise ValueError(f"flash_attention is self-attention: q {q_BLHK.shape} needs k and v of "
                     f"shape [{b}, {l}, kv_heads, {d}], got {k_BSGK.shape} and {v_BSGK.shape}")
  if h % k_BSGK.shape[2]:
    raise ValueError(f"{h} query heads are not a multiple of {k_BSGK.shape[2]} kv heads")
  if segment_ids_BL.shape != (b, l):
    raise ValueError(f"segment ids have shape {segment_ids_BL.shape}, expected {(b, l)}")
  if not q_BLHK.dtype == k_BSGK.dtype == v_BSGK.dtype or q_BLHK.dtype.name not in SUPPORTED_DTYPES:
    raise UserError(f"flash attention takes q, k, v of one dtype among {SUPPORTED_DTYPES}, got "
                    f"{q_BLHK.dtype}, {k_BSGK.dtype}, {v_BSGK.dtype}")
  lowering = lowering or default_lowering()
  if lowering not in LOWERINGS:
    raise UserError(f"flash attention lowering {lowering!r}; choose one of {sorted(LOWERINGS)}")
  if interpret is None:
    interpret = jax.default_backend() != lowering
  plan = make_plan(l, d, causal=causal, block_sizes=block_sizes or FlashBlockSizes(),
                   lowering=lowering, interpret=interpret)

  pad_length = plan.padded_length - l
  # Triton tiles are powers of two >= 16 in every dimension, the head dim included; zero
  # columns change no logit and give zero output columns, which are sliced off.
  pad_dim = max(16, _next_power_of_2(d)) - d if lowering == "gpu" else 0
  if pad_length or pad_dim:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, pad_length), (0, 0), (0, pad_dim)))
    q_BLHK, k_BSGK, v_BSGK = pad(q_BLHK), pad(k_BSGK), pad(v_BSGK)
    segment_ids_BL = jnp.pad(segment_ids_BL, ((0, 0), (0, pad_length)))
  out_BLHK = _flash(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL.astype(jnp.int32), plan)
  return out_BLHK[:, :l, :, :d]
