"""Attention implementations head to head: time, TFLOP/s and planned scratch memory.

    python tools/bench_attention.py                       # the full sweep (for a GPU or TPU)
    python tools/bench_attention.py --impls=xla,pallas --seq_lens=128,256 --head_dims=32 \\
        --gqa=1,4 --num_heads=4 --tokens=512 --iters=2     # a subset small enough for a CPU

For each (implementation, sequence length, head dim, GQA ratio) it times the forward pass and
forward+backward (gradients of q, k, v) of causal attention over packed documents, and prints one
table row. Batch = max(1, tokens // seq_len), so each row does comparable work.

FLOPs follow FlashAttention-2 (2307.08691, section 4): forward = 4·B·H·L²·D, halved when causal
(two matmuls, masked half skipped); backward = 2.5 x forward (five matmuls; the recomputed
QKᵀ is not counted). Memory is XLA's compiled `temp_size_in_bytes`: scratch beyond inputs and
outputs, where XLA attention's [L, L] matrices show up. On CPU, 'pallas' runs in interpret mode
and its times mean nothing about kernel speed.
"""

import argparse
import sys

import gin
import jax
import jax.numpy as jnp

from jaxlm.benchmarking import attention_flops, time_attention
from jaxlm.errors import UserError
from jaxlm.kernels import attention_impls  # choose_attention_impl.


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--impls", default="xla,pallas,cudnn,splash")
  parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--gqa", default="1,4,8", help="query heads per KV head")
  parser.add_argument("--num_heads", type=int, default=32, help="query heads")
  parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
  parser.add_argument("--doc_len", type=int, default=2048, help="packed document length")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--non_causal", action="store_true")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--block_sizes", default="",
                      help="pallas tiles block_q,block_k,block_q_bwd,block_k_bwd")
  args = parser.parse_args(argv)

  if args.block_sizes:
    for name, value in zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"),
                           _ints(args.block_sizes)):
      gin.bind_parameter(f"FlashBlockSizes.{name}", value)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}); dtype {args.dtype}; "
        f"{'non-causal' if args.non_causal else 'causal'}; documents of {args.doc_len} tokens")
  if device.platform == "cpu":
    print("note: on CPU 'pallas' runs in interpret mode; its times say nothing about kernel speed")
  header = (f"{'impl':<8}{'L':>7}{'D':>5}{'GQA':>5}{'B':>4}{'fwd ms':>10}{'TFLOP/s':>9}"
            f"{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'scratch MiB fwd / fwd+bwd':>28}")
  print(header)
  print("-" * len(header))
  causal, dtype = not args.non_causal, jnp.dtype(args.dtype)
  for impl in args.impls.split(","):
    unavailable = None  # Said once per implementation, not once per row.
    for length in _ints(args.seq_lens):
      for head_dim in _ints(args.head_dims):
        for ratio in _ints(args.gqa):
          batch = max(1, args.tokens // length)
          name = impl
          if impl == "auto":  # Show what 'auto' picked for this shape.
            q_shape = jax.ShapeDtypeStruct((batch, length, args.num_heads, head_dim), dtype)
            name = f"auto:{attention_impls.choose_attention_impl(q_shape)}"
          row = f"{name:<8}{length:>7}{head_dim:>5}{ratio:>5}{batch:>4}"
          try:
            (t_f, m_f), (t_fb, m_fb) = time_attention(
                impl, batch, length, args.num_heads, args.num_heads // ratio, head_dim, dtype,
                causal, args.doc_len, args.iters)
          except UserError as e:
            if str(e) != unavailable:
              print(f"{row}  n/a: {e}")
            unavailable = str(e)
            continue
          except Exception as e:  # pylint: disable=broad-except
            # Out of memory or a shape the library refuses: report the row, keep sweeping.
            print(f"{row}  failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
          flops = attention_flops(batch, args.num_heads, length, head_dim, causal)
          print(f"{row}{t_f * 1e3:>10.2f}{flops / t_f / 1e12:>9.2f}{t_fb * 1e3:>12.2f}"
                f"{3.5 * flops / t_fb / 1e12:>9.2f}{m_f / 2**20:>14.1f} / {m_fb / 2**20:<11.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
