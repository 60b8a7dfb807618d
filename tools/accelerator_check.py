"""One command for a machine with a GPU or TPU: do jaxlm's kernels compute what they should
there, how fast is attention, and what MFU does a 1B-parameter training step reach.

    python tools/accelerator_check.py --out=/tmp/accel            # on the device: < 8 minutes
    python tools/accelerator_check.py --dry_run --out=/tmp/accel  # anywhere: tiny shapes (CPU:
                                                                  # Pallas in interpret mode)

1. Correctness: our Pallas flash attention, compiled for the device, against XLA attention,
   forward and backward (dq, dk, dv), causal, grouped-query (1 and 4 query heads per KV head),
   packed documents, in float32 and bfloat16. The reference is XLA attention on the same inputs
   in float32 at the highest matmul precision; a case passes when the kernel's largest error,
   relative to the reference's largest magnitude, is at most twice XLA's own attention's in the
   same dtype (plus 1e-3): the device's arithmetic (TF32, bfloat16) sets the bar, not a number
   chosen here. Any failure makes the exit code 1.
2. Attention speed: pallas, cudnn (GPU) or splash (TPU), and xla at head_dim 128, bfloat16,
   causal, sequences 2k to 16k with 16k tokens per batch: forward and forward+backward time and
   TFLOP/s, FLOPs counted as FlashAttention-2 does with the causal half skipped
   (jaxlm.benchmarking.attention_flops).
3. Training step: gin/models/1b.gin in bfloat16 compute with the fastest attention of part 2 at
   the step's sequence length, the trainer's own jitted step (AdamW, one device), step time,
   tokens/s and MFU against this device's measured bfloat16 matmul peak.
4. Writes accelerator_check.json and accelerator_check.md (the table for the README) into --out.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.benchmarking import (BenchConfig, attention_flops, attention_fwd_and_grad,
                                attention_inputs, benchmark_stage, compiled_train_step,
                                random_batch, time_attention)
from jaxlm.config import gin_config
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig, count_params, flops, init_params

# (device run, dry run) settings.
SETTINGS = {
    False: dict(correct_lens=(512, 2048), correct_heads=8, correct_head_dim=128,
                speed_lens=(2048, 4096, 8192, 16384), speed_heads=16, speed_head_dim=128,
                speed_tokens=16384, iters=10, model_gin="gin/models/1b.gin", batch=8,
                seq_len=2048, steps=10, warmup=2, peak_size=8192),
    True: dict(correct_lens=(64,), correct_heads=4, correct_head_dim=32,
               speed_lens=(64, 128), speed_heads=2, speed_head_dim=32, speed_tokens=256,
               iters=1, model_gin="gin/models/tiny.gin", batch=2, seq_len=64, steps=2, warmup=1,
               peak_size=256),
}
GQA_RATIOS = (1, 4)


def vendor_attention(platform: str) -> str | None:
  return {"gpu": "cudnn", "tpu": "splash"}.get(platform)


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def outputs_and_grads(impl: str, ids, do, qkv) -> tuple:
  """(out, dq, dk, dv) of one implementation, in one compiled program (one compile per case
  keeps the device run under its time budget)."""
  fwd, fwd_bwd = attention_fwd_and_grad(impl, ids, do)
  return jax.jit(lambda q, k, v: (fwd(q, k, v), *fwd_bwd(q, k, v)))(*qkv)


def check_correctness(lens, heads, head_dim) -> list[dict]:
  """Pallas and XLA attention against a float32, highest-precision XLA reference."""
  rows = []
  for length in lens:
    for ratio in GQA_RATIOS:
      q, k, v, do, ids = attention_inputs(2, length, heads, heads // ratio, head_dim,
                                          jnp.float32, doc_len=max(length // 3, 1))
      with jax.default_matmul_precision("highest"):
        reference = outputs_and_grads("xla", ids, do, (q, k, v))
      for dtype in (jnp.float32, jnp.bfloat16):
        cast = [x.astype(dtype) for x in (q, k, v)]
        errors = {}
        for impl in ("xla", "pallas"):
          outputs = outputs_and_grads(impl, ids, do.astype(dtype), cast)
          errors[impl] = {name: relative_error(o, r) for name, o, r in
                          zip(("out", "dq", "dk", "dv"), outputs, reference)}
        ok = all(errors["pallas"][n] <= 2 * errors["xla"][n] + 1e-3 for n in errors["pallas"])
        rows.append({"seq_len": length, "gqa": ratio, "dtype": jnp.dtype(dtype).name,
                     "head_dim": head_dim, "pallas_error": errors["pallas"],
                     "xla_error": errors["xla"], "ok": ok})
  return rows


def time_attentions(impls, lens, heads, head_dim, tokens, iters) -> list[dict]:
  rows = []
  for impl in impls:
    for length in lens:
      batch = max(1, tokens // length)
      row = {"impl": impl, "seq_len": length, "batch": batch, "heads": heads,
             "head_dim": head_dim}
      try:
        (fwd_s, _), (fwd_bwd_s, _) = time_attention(impl, batch, length, heads, heads, head_dim,
                                                    jnp.bfloat16, True, length, iters)
      except UserError as e:  # Not available on this backend.
        rows.append({**row, "error": str(e)})
        continue
      except Exception as e:  # pylint: disable=broad-except
        # Out of memory or a shape the library refuses: report it, keep going.
        rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        continue
      flop = attention_flops(batch, heads, length, head_dim, causal=True)
      rows.append({**row, "fwd_ms": fwd_s * 1e3, "fwd_tflops": flop / fwd_s / 1e12,
                   "fwd_bwd_ms": fwd_bwd_s * 1e3,
                   "fwd_bwd_tflops": 3.5 * flop / fwd_bwd_s / 1e12})
  return rows


def fastest_attention(rows: list[dict], seq_len: int) -> str:
  """The implementation with the shortest forward+backward at the timed length nearest to
  `seq_len` ('auto' if none ran)."""
  timed = [r for r in rows if "fwd_bwd_ms" in r]
  if not timed:
    return "auto"
  nearest = min({r["seq_len"] for r in timed}, key=lambda n: abs(n - seq_len))
  return min((r for r in timed if r["seq_len"] == nearest), key=lambda r: r["fwd_bwd_ms"])["impl"]


def model_from_gin(path: str, **overrides) -> ModelConfig:
  gin_config.parse([path], [])
  try:
    return ModelConfig(**overrides)
  finally:
    gin.clear_config()


def time_training_step(model: ModelConfig, batch: int, seq_len: int, steps: int,
                       warmup: int, peak_flops: float) -> dict:
  bench = BenchConfig(vocab_size=model.vocab_size, d_model=model.d_model,
                      num_layers=model.num_layers, num_heads=model.num_heads,
                      mlp_dim=model.mlp_dim, seq_len=seq_len, batch_size=batch)
  stage = benchmark_stage(bench, model.dtype, steps + warmup + 1, model=model)
  step, compile_s, _ = compiled_train_step(stage, random_batch(bench))
  first_loss = float(step()["train/loss"])
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_s = batch * seq_len / step_s
  model_flops = flops.flops_per_token(model, seq_len) * tokens_per_s
  return {"params": count_params(jax.eval_shape(lambda: init_params(model, jax.random.key(0)))),
          "batch": batch, "seq_len": seq_len, "attention": model.attention_impl,
          "remat": model.remat, "compile_s": compile_s, "step_ms": step_s * 1e3,
          "step_ms_min_max": [min(times) * 1e3, max(times) * 1e3],
          "tokens_per_s": tokens_per_s, "model_tflops": model_flops / 1e12,
          "mfu": model_flops / peak_flops, "first_loss": first_loss}


def markdown(report: dict) -> str:
  device, lines = report["device"], []
  lines += [f"**Accelerator check** ({report['date']}, {device['kind']}, {device['platform']}, "
            f"jax {report['jax']}; `python tools/accelerator_check.py"
            f"{' --dry_run' if report['dry_run'] else ''}`)", ""]
  lines += ["| Pallas flash attention vs XLA | seq | GQA | dtype | worst relative error "
            "(pallas / xla) | |", "|---|---:|---:|---|---|---|"]
  for r in report["correctness"]:
    worst = max(r["pallas_error"], key=r["pallas_error"].get)
    lines.append(f"| fwd + bwd, causal, packed | {r['seq_len']} | {r['gqa']} | {r['dtype']} | "
                 f"{worst}: {r['pallas_error'][worst]:.2e} / {r['xla_error'][worst]:.2e} | "
                 f"{'ok' if r['ok'] else '**FAIL**'} |")
  lines += ["", "| attention (bf16, causal, head_dim "
            f"{report['attention'][0]['head_dim'] if report['attention'] else '-'}) | seq | "
            "fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
            "|---|---:|---:|---:|---:|---:|"]
  for r in report["attention"]:
    if "error" in r:
      lines.append(f"| {r['impl']} | {r['seq_len']} | n/a: {r['error'][:60]} | | | |")
    else:
      lines.append(f"| {r['impl']} | {r['seq_len']} | {r['fwd_ms']:.2f} | "
                   f"{r['fwd_tflops']:.3g} | {r['fwd_bwd_ms']:.2f} | "
                   f"{r['fwd_bwd_tflops']:.3g} |")
  s = report["step"]
  lines += ["", f"Training step ({report['model_gin']}, bfloat16 compute, attention "
            f"{s['attention']}, remat {s['remat']}, batch {s['batch']} x {s['seq_len']}): "
            f"{s['step_ms']:.1f} ms per step, {s['tokens_per_s']:,.0f} tokens/s, "
            f"{s['model_tflops']:.3g} model TFLOP/s, MFU {100 * s['mfu']:.1f}% of the measured "
            f"bfloat16 matmul peak ({report['peak_tflops']:.3g} TFLOP/s)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/accelerator_check.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder for the JSON and markdown results")
  parser.add_argument("--dry_run", action="store_true",
                      help="tiny shapes (on CPU the Pallas kernel runs in interpret mode)")
  parser.add_argument("--remat", default="dots", help="ModelConfig.remat of the 1B step")
  parser.add_argument("--batch", type=int, default=None, help="the 1B step's batch size")
  args = parser.parse_args(argv)
  settings = SETTINGS[args.dry_run]
  device = jax.devices()[0]
  if device.platform == "cpu" and not args.dry_run:
    print("accelerator_check: error: no GPU or TPU here; use --dry_run to check the tool on CPU",
          file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  started = time.perf_counter()
  report = {"date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
            "jax": jax.__version__, "model_gin": settings["model_gin"],
            "device": {"platform": device.platform, "kind": device.device_kind,
                       "count": jax.device_count()}}
  report["correctness"] = check_correctness(settings["correct_lens"], settings["correct_heads"],
                                            settings["correct_head_dim"])
  impls = ["pallas", *filter(None, [vendor_attention(device.platform)]), "xla"]
  report["attention"] = time_attentions(impls, settings["speed_lens"], settings["speed_heads"],
                                        settings["speed_head_dim"], settings["speed_tokens"],
                                        settings["iters"])
  report["peak_tflops"] = flops.measure_peak_flops("bfloat16", size=settings["peak_size"]) / 1e12
  best = fastest_attention(report["attention"], settings["seq_len"])
  model = model_from_gin(settings["model_gin"], dtype="bfloat16", attention_impl=best,
                         remat=args.remat)
  report["step"] = time_training_step(model, args.batch or settings["batch"],
                                      settings["seq_len"], settings["steps"], settings["warmup"],
                                      report["peak_tflops"] * 1e12)
  report["seconds"] = time.perf_counter() - started
  with open(os.path.join(args.out, "accelerator_check.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  table = markdown(report)
  with open(os.path.join(args.out, "accelerator_check.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table)
  print(f"({report['seconds']:.0f} s)")
  return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
  sys.exit(main())
