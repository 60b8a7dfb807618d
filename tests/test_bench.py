"""tools/bench.py: the FLOP formula against a hand count and against the model's own matmuls,
and the harness end to end on bench-tiny (a test of the tool, not of speed)."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO_ROOT, load_tool
from jaxlm.model import flops
from jaxlm.model import ModelConfig, count_params, forward, init_params


bench = load_tool("bench")
# A model small enough that both frameworks take a step in well under a second.
MICRO = bench.BenchConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                          seq_len=16, batch_size=2)


def test_bench_tiny_flops_per_token_match_a_hand_count():
  cfg = bench.CONFIGS["bench-tiny"].model_config("float32")
  # Per layer: q, k, v, o 4 x 256x256 = 262144; gate, up, down 3 x 256x704 = 540672.
  # 4 layers = 3211264, plus the untied head 256x256 = 65536: N = 3276800 matmul weights.
  assert flops.matmul_params(cfg) == 3_276_800
  # 6N = 19660800; attention 12 * layers 4 * heads 4 * head_dim 64 * seq 256 = 3145728.
  assert flops.flops_per_token(cfg, seq_len=256) == 19_660_800 + 3_145_728
  # N is every parameter but the input embedding (256x256) and the 9 norm gains (256 each).
  params = init_params(cfg, jax.random.key(0))
  assert count_params(params) == 3_276_800 + 256 * 256 + 9 * 256


def _dot_flops(jaxpr) -> int:
  """2·M·N·K summed over every dot_general in a jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      contracted = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if hasattr(sub, "jaxpr"):
          total += _dot_flops(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))
        elif hasattr(sub, "eqns"):
          total += _dot_flops(sub)
  return total


def test_forward_matmul_flops_are_a_third_of_the_training_formula():
  # The forward pass does 2 FLOPs per matmul weight and 4·H·K·L for QKᵀ and AV per token and
  # layer; training adds two more of each (activation and weight gradients): the formula's 6
  # and 12. Counting the model's own dot_generals checks that nothing is missed or doubled.
  cfg = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    mlp_dim=80, max_seq_len=24)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 24), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: forward(p, cfg, tokens))(params).jaxpr
  assert 3 * _dot_flops(jaxpr) == flops.flops_per_token(cfg, seq_len=24) * tokens.size


@pytest.mark.slow  # Both frameworks in subprocesses; .ci/run runs the slow tests.
def test_harness_runs_end_to_end_on_bench_tiny(tmp_path):
  out = tmp_path / "bench.json"
  done = subprocess.run(
      [sys.executable, "tools/bench.py", "--configs=bench-tiny", "--impls=jaxlm", "--steps=2",
       "--warmup=1", "--peak_sizes=256", f"--json={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "bench-tiny   jaxlm  float32" in done.stdout
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  assert row["steps"] == 2 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
  assert row["flops_per_token"] == flops.flops_per_token(
      bench.CONFIGS["bench-tiny"].model_config("float32"), 256)
  assert 0 < row["mfu"] == pytest.approx(row["achieved_flops"] / result["peaks"]["float32"]["xla"])
  assert row["peak_mem_mib"] > 0 and row["xla_plan_bytes"] > 0
  assert len(row["step_cpu_s"]) == 2
  # The default, --allocator=keep, is what the trainer sets up: mallopt and CPU steps run one at
  # a time (jaxlm/training/host_memory.py), not just the mallopt.
  assert result["allocator"] == "keep" and row["cpu_async_dispatch"] is False
  assert math.isfinite(row["last_loss"])


def test_unknown_config_is_one_clear_error():
  done = subprocess.run([sys.executable, "tools/bench.py", "--configs=bench-huge"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 2 and "unknown config or impl 'bench-huge'" in done.stderr


def test_repeats_give_the_median_ratio_and_its_spread():
  def row(repeat, impl, tokens_per_s, mfu):
    return {"config": "bench-tiny", "dtype": "float32", "repeat": repeat, "impl": impl,
            "tokens_per_s": tokens_per_s, "mfu": mfu}
  rows = [row(0, "jaxlm", 1200, 0.5), row(0, "torch", 1000, 0.4),
          row(1, "jaxlm", 900, 0.4), row(1, "torch", 1000, 0.4),
          row(2, "jaxlm", 1000, 0.6), row(2, "torch", 500, 0.2)]
  (line,) = bench.ratio_summary(rows)
  # Ratios per invocation 1.2, 0.9, 2.0: median 1.2; MFUs 0.5, 0.4, 0.6: median 0.5.
  assert line == ("bench-tiny float32: jaxlm / torch throughput = 1.20x (0.90-2.00, n=3); "
                  "jaxlm MFU 50.0% (40.0%-60.0%, n=3)")


def test_the_host_line_names_the_cpu_and_its_vector_extensions():
  host = bench.host_cpu()
  assert "ISA:" in host and host.split(",")[0].strip()


def test_repeats_below_one_is_one_clear_error(capsys):
  assert bench.main(["--repeats=0", "--impls=jaxlm"]) == 2
  assert "--repeats=0; give 1 or more" in capsys.readouterr().err


def test_jaxlm_and_torch_sides_build_the_same_model_and_loss():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  torch_side = bench.run_torch(MICRO, "float32", steps=1, warmup=1)
  jax_side = bench.run_jaxlm(MICRO, "float32", steps=1, warmup=1)
  params = init_params(MICRO.model_config("float32"), jax.random.key(0))
  # Same architecture: the same parameter count (untied head, no biases, norm gains included).
  assert torch_side["num_params"] == count_params(params)
  # Same task: both start near ln(V) on uniform random tokens (init std 0.02 on both sides).
  for side in (torch_side, jax_side):
    assert side["first_loss"] == pytest.approx(math.log(MICRO.vocab_size), abs=0.05)


def test_compare_step_programs_needs_two_checkouts(tmp_path, capsys):
  tool = load_tool("compare_step_programs")
  assert tool.main([str(tmp_path)]) == 2
  assert tool.main([str(tmp_path), str(REPO_ROOT)]) == 2  # tmp_path holds no jaxlm/.
  assert "give two checkouts of jaxlm" in capsys.readouterr().err


def test_the_step_profile_attributes_op_time_to_parts_of_the_model(tmp_path, capsys):
  """tools/profile_step.py: a real trace of bench-tiny's step, every op's time given to a part
  (attention, MLP, optimizer update, ...) and a pass; the shares add up to the whole."""
  profile_step = load_tool("profile_step")
  assert profile_step.main(["--configs=bench-tiny", "--steps=1", "--warmup=1",
                            f"--out={tmp_path}"]) == 0
  (result,) = json.loads((tmp_path / "profile.json").read_text())
  assert result["step_ms"] > 0
  assert sum(r["share"] for r in result["rows"]) == pytest.approx(1.0)
  parts = {(r["part"], r["pass"]) for r in result["rows"]}
  assert {("attention", "forward"), ("attention", "backward"), ("mlp", "backward"),
          ("optimizer", "update")} <= parts
  assert "bench-tiny float32" in capsys.readouterr().out
  assert profile_step.main(["--configs=bench-huge"]) == 2
  assert "unknown config 'bench-huge'" in capsys.readouterr().err


def test_bench_moe_compares_models_with_the_same_active_parameters(capsys):
  """tools/bench_moe.py: E experts of mlp_dim / k units, top-k: each token multiplies the dense
  model's MLP weights (plus the router's), while the model holds E / k times them."""
  bench_moe = load_tool("bench_moe")
  dense = bench_moe.model_for("dense", "bench-tiny", experts=8, top_k=2, capacity_factor=1.25)
  moe = bench_moe.model_for("capacity", "bench-tiny", experts=8, top_k=2, capacity_factor=1.25)
  routers = moe.num_layers * moe.d_model * 8
  assert flops.matmul_params(moe) == flops.matmul_params(dense) + routers
  mlp_weights = 3 * dense.d_model * dense.mlp_dim * dense.num_layers
  assert count_params(init_params(moe, jax.random.key(0))) == (
      count_params(init_params(dense, jax.random.key(0))) + 3 * mlp_weights + routers)
  assert bench_moe.main(["--arms=dense,sorted"]) == 2
  assert "unknown arm 'sorted'" in capsys.readouterr().err


def test_bench_optimizers_memory_only_gives_the_bytes_from_shapes(capsys):
  """--memory_only compiles nothing: on a small model its bytes are the trees' own."""
  bench_optimizers = load_tool("bench_optimizers")
  row = bench_optimizers.measure("adamw", str(REPO_ROOT / "gin/models/tiny.gin"), 64, 2, 0, 8,
                                 memory_only=True)
  cfg = bench_optimizers.model_config(str(REPO_ROOT / "gin/models/tiny.gin"), 64, False)
  n = count_params(init_params(cfg, jax.random.key(0)))
  # AdamW: the params once, the two moments (plus optax's scalar counts) twice.
  assert row["param_bytes"] == 4 * n and 8 * n <= row["opt_bytes"] < 8 * n + 64
  assert row["temp_bytes"] is None


def test_bench_optimizers_refuses_what_it_cannot_measure(capsys):
  bench_optimizers = load_tool("bench_optimizers")
  assert bench_optimizers.main(["--optimizers=adamw,lion"]) == 2
  assert bench_optimizers.main(["--steps=4"]) == 2
  assert "choose --optimizers from ['adamw', 'galore', 'muon', 'sltrain']" in capsys.readouterr().err
