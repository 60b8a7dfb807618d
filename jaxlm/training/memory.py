"""What a stage's training holds in memory, logged when it starts and kept in every checkpoint's
record (`RunRecord.memory`): the params', optimizer state's and method state's bytes (the whole
model, over all devices) and XLA's plan for one device's train step (its arguments, and the
temporaries it allocates: activations, gradients, workspace), from the compiled step's own
memory analysis. Memory-efficient optimizers and parameterisations (GaLore, SLTrain) are
compared by these numbers."""

import jax


def tree_bytes(tree) -> int:
  """Bytes of every leaf of `tree` (arrays or ShapeDtypeStructs), whole (not per device)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_accounting(state, compiled_step) -> dict[str, float]:
  """memory/... bytes of a train state and of the compiled step that updates it."""
  found = {"memory/param_bytes": tree_bytes(state.params),
           "memory/optimizer_state_bytes": tree_bytes(state.opt_state),
           "memory/method_state_bytes": tree_bytes(state.method_state)}
  plan = compiled_step.memory_analysis()
  if plan is not None:  # A backend without a plan (none of CPU, GPU, TPU) logs the trees alone.
    found["memory/xla_argument_bytes_per_device"] = plan.argument_size_in_bytes
    found["memory/xla_temp_bytes_per_device"] = plan.temp_size_in_bytes
  return {name: float(value) for name, value in found.items()}


def describe_memory(memory: dict[str, float]) -> str:
  mib = lambda name: f"{memory[name] / 2**20:,.1f} MiB" if name in memory else "-"
  return (f"memory: params {mib('memory/param_bytes')}, optimizer state "
          f"{mib('memory/optimizer_state_bytes')}, method state "
          f"{mib('memory/method_state_bytes')}; XLA's step plan per device: arguments "
          f"{mib('memory/xla_argument_bytes_per_device')}, temporaries "
          f"{mib('memory/xla_temp_bytes_per_device')}")
