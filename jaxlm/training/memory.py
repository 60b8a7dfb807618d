"""What a stage's training holds in memory, logged when it starts and kept in every checkpoint's
record (`RunRecord.memory`): the params', optimizer state's and method state's bytes (the whole
model, over all devices) and XLA's plan for one device's train step (its arguments, and the
temporaries it allocates: activations, gradients, workspace), from the compiled step's own
memory analysis. Memory-efficient optimizers and parameterisations (GaLore, SLTrain) are
compared by these numbers. SLTrain's sparse supports are constants of the compiled step, not
state: their index bytes are counted apart (memory/support_bytes) and belong with the params'.
"""

import math

import jax

from jaxlm.model.anatomy import anatomy
from jaxlm.model.sparse_plus_low_rank import support_count


def tree_bytes(tree) -> int:
  """Bytes of every leaf of `tree` (arrays or ShapeDtypeStructs), whole (not per device)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def support_bytes(model) -> int:
  """Bytes of the int32 indices of every SLTrain weight's sparse support (0 for a dense model)."""
  return sum(4 * support_count(model, math.prod(part.shape)) for part in anatomy(model)
             if part.stored != "dense")


def memory_accounting(state, compiled_step, model) -> dict[str, float]:
  """memory/... bytes of a train state of `model` and of the compiled step that updates it
  (`compiled_step` None: the trees alone, e.g. for a model too large to compile here)."""
  found = {"memory/param_bytes": tree_bytes(state.params),
           "memory/support_bytes": support_bytes(model),
           "memory/optimizer_state_bytes": tree_bytes(state.opt_state),
           "memory/method_state_bytes": tree_bytes(state.method_state)}
  plan = None if compiled_step is None else compiled_step.memory_analysis()
  if plan is not None:  # A backend without a plan (none of CPU, GPU, TPU) logs the trees alone.
    found["memory/xla_argument_bytes_per_device"] = plan.argument_size_in_bytes
    found["memory/xla_temp_bytes_per_device"] = plan.temp_size_in_bytes
  return {name: float(value) for name, value in found.items()}


def describe_memory(memory: dict[str, float]) -> str:
  mib = lambda name: f"{memory[name] / 2**20:,.1f} MiB" if name in memory else "-"
  return (f"memory: params {mib('memory/param_bytes')} (+ sparse supports "
          f"{mib('memory/support_bytes')}), optimizer state "
          f"{mib('memory/optimizer_state_bytes')}, method state "
          f"{mib('memory/method_state_bytes')}; XLA's step plan per device: arguments "
          f"{mib('memory/xla_argument_bytes_per_device')}, temporaries "
          f"{mib('memory/xla_temp_bytes_per_device')}")
