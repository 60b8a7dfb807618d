"""Sharded training: same losses on every mesh, shardings follow the rule set, gradient
accumulation equals the full batch, and two processes equal one (jax.distributed over gloo)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import REPO_ROOT
from jaxlm import parallel
from jaxlm.errors import UserError
from jaxlm.model import ModelConfig
from jaxlm.stages import Stage
from jaxlm.train_step import sharded_init, state_shardings

# Sharded matmuls and all-reduces add float32 partial sums in other orders (~1e-7 relative per
# op); 20 Adam steps amplify that to the observed ~3e-7. A real bug (a wrong shard, a missing
# all-reduce, a dropped micro-batch) moves the loss by more than 1e-2.
RTOL = 1e-5


def _mesh_flags(data, fsdp, tensor):
  return [f"--gin.MeshConfig.data={data}", f"--gin.MeshConfig.fsdp={fsdp}",
          f"--gin.MeshConfig.tensor={tensor}"]


def _run_worker(model_root, corpus, devices, runs):
  """Start tests/mesh_worker.py with `devices` CPU devices; returns its Popen."""
  spec = {"model_dir": str(model_root / "runs"), "corpus": str(corpus), "runs": runs}
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen([sys.executable, "tests/mesh_worker.py", json.dumps(spec)],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(process):
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def test_loss_trajectory_is_the_same_on_every_mesh_and_with_accumulation(tmp_path, small_text_file):
  single = _result(_run_worker(tmp_path / "one", small_text_file, 1, {
      "1x1x1": _mesh_flags(1, 1, 1),
      "1x1x1/accumulate4": [*_mesh_flags(1, 1, 1), "--gin.TrainerConfig.microbatches=4"]}))
  many = _result(_run_worker(tmp_path / "eight", small_text_file, 8, {
      "8x1x1": _mesh_flags(8, 1, 1),
      "1x8x1": _mesh_flags(1, 8, 1),
      "2x2x2": _mesh_flags(2, 2, 2),
      "2x1x4": _mesh_flags(2, 1, 4),
      "2x2x2/accumulate4": [*_mesh_flags(2, 2, 2), "--gin.TrainerConfig.microbatches=4"],
      # The Pallas kernel (interpret mode on CPU) runs per shard through shard_map.
      "2x2x2/pallas": [*_mesh_flags(2, 2, 2), "--gin.ModelConfig.attention_impl='pallas'"]}))
  reference = np.array(single["1x1x1"])
  assert len(reference) == 20 and reference[-1] < reference[0] - 1.0  # It really trained.
  for name, losses in {**single, **many}.items():
    np.testing.assert_allclose(losses, reference, rtol=RTOL, err_msg=name)


def test_two_processes_give_the_same_losses_as_one_process_with_four_devices(tmp_path, small_text_file):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workers = [
      _run_worker(tmp_path / "multi", small_text_file, 2, {"2proc": [
          *_mesh_flags(4, 1, 1),
          f"--gin.DistributedConfig.coordinator_address='127.0.0.1:{port}'",
          "--gin.DistributedConfig.num_processes=2",
          f"--gin.DistributedConfig.process_id={i}"]})
      for i in range(2)]
  one_process = _result(_run_worker(tmp_path / "single", small_text_file, 4, {"1proc": _mesh_flags(4, 1, 1)}))
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  lead = json.loads(next(l for l in outputs[0][0].splitlines() if l.startswith("RESULT "))[7:])
  assert "RESULT" not in outputs[1][0]  # Only process 0 reports and writes logs.
  np.testing.assert_allclose(lead["2proc"], one_process["1proc"], rtol=RTOL)
  assert os.path.isdir(tmp_path / "multi" / "runs" / "2proc" / "checkpoints" / "20")


# Logical axes -> mesh axes for a few parameters under each rule set.
SHARDING_TABLE = {
    "data_parallel": {
        ("embed", "embedding"): P(None, None),
        ("layer_0", "attention", "query"): P(None, None, None),
        ("layer_0", "mlp", "down"): P(None, None),
        ("lm_head",): P(None, None),
    },
    "fsdp": {
        ("embed", "embedding"): P(None, "fsdp"),
        ("layer_0", "attention", "query"): P("fsdp", None, None),
        ("layer_0", "mlp", "down"): P(None, "fsdp"),
        ("lm_head",): P("fsdp", None),
    },
    "fsdp_tensor": {
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("layer_0", "attention", "query"): P("fsdp", "tensor", None),
        ("layer_0", "attention", "key"): P("fsdp", "tensor", None),
        ("layer_0", "attention", "out"): P("tensor", None, "fsdp"),
        ("layer_0", "mlp", "gate"): P("fsdp", "tensor"),
        ("layer_0", "mlp", "down"): P("tensor", "fsdp"),
        ("layer_0", "mlp_norm", "scale"): P("fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
    },
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("rules", sorted(SHARDING_TABLE))
def test_param_and_optimizer_state_shardings_follow_the_rule_set(rules):
  config = parallel.MeshConfig(data=1, rules=rules)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  stage = Stage(num_steps=200, model=ModelConfig(d_model=64, num_layers=1, mlp_dim=128))
  shardings = state_shardings(stage, mesh, config.resolved_rules())
  state = sharded_init(stage, shardings, jax.random.key(0))
  # inject_hyperparams(chain(clip, adamw)): adamw's first part is scale_by_adam.
  adam = state.opt_state.inner_state[1][0]
  for path, spec in SHARDING_TABLE[rules].items():
    assert _get(state.params, path).sharding.spec == spec, path
    assert _get(adam.mu, path).sharding.spec == spec, path
    assert _get(adam.nu, path).sharding.spec == spec, path
  assert adam.count.sharding.spec == P()


def test_a_dimension_that_does_not_divide_its_mesh_axes_is_a_clear_error():
  mesh = AbstractMesh((1, 1, 3), parallel.MESH_AXES)
  stage = Stage(num_steps=200, model=ModelConfig(num_heads=4, num_kv_heads=4))
  with pytest.raises(UserError, match="cannot split evenly"):
    state_shardings(stage, mesh, parallel.RULE_SETS["fsdp_tensor"])


@pytest.mark.parametrize("settings, devices, match", [
    ({"data": -1, "fsdp": 3}, 8, "does not divide the 8 devices"),
    ({"data": 3}, 8, "needs 3 devices but there are 8"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, 8, "needs 16 devices"),
    ({"data": -1, "fsdp": -1}, 8, "at most one -1"),
    ({"rules": (("embed", "model"),)}, 1, "unknown mesh axis 'model'"),  # Found when built.
    ({"rules": "zero4"}, 1, "unknown rule set 'zero4'"),
])
def test_bad_mesh_or_rules_are_clear_errors(settings, devices, match):
  with pytest.raises(UserError, match=match):
    config = parallel.MeshConfig(**settings)
    config.shape(devices)
    config.resolved_rules()


def test_bad_mesh_on_the_command_line_exits_2(tmp_path, small_text_file, capsys):
  from conftest import quick_run_args
  from jaxlm import train
  assert train.main(quick_run_args(tmp_path / "run", small_text_file,
                                   "--gin.MeshConfig.data=3")) == 2
  assert "needs 3 devices but there are 1" in capsys.readouterr().err
