"""Device meshes, logical-axis rules and multi-host start-up.

The model names *logical* axes (`batch`, `embed`, `mlp`, `heads`, ...). A rule set, chosen in
gin, maps them onto the mesh axes `data`, `fsdp`, `tensor` and `expert`; nothing outside this
module names a mesh axis. Rules are ordered candidates: a logical axis takes the first rule whose mesh axes
are not already used by an earlier dimension of the same array (flax's semantics), so
`("embed", "fsdp")` shards weights over fsdp while activations, whose batch dimension already
uses fsdp, keep `embed` whole.
"""

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxlm.errors import UserError
from jaxlm.optim.state_layout import state_layout
from jaxlm.tree_names import flatten_names, path_name
from jaxlm.validation import check_field_types, check_range

log = logging.getLogger("jaxlm")

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The global batch is split over every axis but `tensor`: outside its MoE layers an
# expert-parallel group is data-parallel (as in MaxText and GShard).
BATCH_AXES = ("data", "fsdp", "expert")
# Expert parallelism (GShard, 2006.16668): MoE expert weights split over `expert`; inside an
# MoE layer the tokens dispatched to experts ("expert_batch") leave `expert` to the experts,
# so XLA moves them with an all-to-all.
_EXPERT_RULES = (("expert", "expert"), ("expert_batch", ("data", "fsdp")))

RULE_SETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Replicated weights, sharded batch (DDP).
    "data_parallel": (("batch", BATCH_AXES), *_EXPERT_RULES),
    # ZeRO-3 / FSDP (Rajbhandari et al. 1910.02054): weights and optimizer state sharded along
    # the embedding dimension, gathered per layer by XLA.
    "fsdp": (("batch", BATCH_AXES), ("embed", "fsdp"), *_EXPERT_RULES),
    # FSDP plus Megatron tensor parallelism (Shoeybi et al. 1909.08053): heads and MLP columns
    # split over `tensor`.
    "fsdp_tensor": (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"),
                    ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
                    *_EXPERT_RULES),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: all remaining devices) and the logical-axis rule set."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1  # Expert parallelism: MoE experts split over this many devices.
  rules: Any = "fsdp_tensor"  # A RULE_SETS name, or ((logical, mesh axis or None), ...).

  def __post_init__(self):
    check_field_types(self)
    self.resolved_rules()  # An unknown rule set or mesh axis fails when the config is built.

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise UserError(f"mesh {tuple(sizes)} is invalid: sizes must be >= 1, with at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise UserError(f"mesh {tuple(sizes)} does not divide the {num_devices} devices; "
                        "choose MeshConfig sizes whose product divides the device count")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices "
                      f"but there are {num_devices}; make the product of MeshConfig sizes match")
    return tuple(sizes)

  def resolved_rules(self) -> tuple[tuple[str, Any], ...]:
    if isinstance(self.rules, str):
      if self.rules not in RULE_SETS:
        raise UserError(f"unknown rule set {self.rules!r}; choose one of {sorted(RULE_SETS)} "
                        "or give ((logical_axis, mesh_axis), ...)")
      return RULE_SETS[self.rules]
    rules = tuple((str(name), target) for name, target in self.rules)
    for name, target in rules:
      targets = target if isinstance(target, (tuple, list)) else (target,)
      unknown = [t for t in targets if t is not None and t not in MESH_AXES]
      if unknown:
        raise UserError(f"rule ({name!r}, {target!r}) names unknown mesh axis {unknown[0]!r}; "
                        f"mesh axes are {MESH_AXES}")
    return rules


def mesh_for_devices(config: MeshConfig, num_devices: int) -> MeshConfig:
  """`config` if it fits `num_devices`, else all of them on the data axis with the same rules
  (a run trained on 8 devices, evaluated on one), saying so."""
  try:
    config.shape(num_devices)
    return config
  except UserError:
    fitted = dataclasses.replace(config, data=-1, fsdp=1, tensor=1, expert=1)
    logging.getLogger("jaxlm").warning(
        "the saved mesh (data=%s, fsdp=%s, tensor=%s, expert=%s) does not fit the %d device(s) "
        "here; using data=%d (bind MeshConfig.* to choose another)", config.data, config.fsdp,
        config.tensor, config.expert, num_devices, num_devices)
    return fitted


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A mesh laid out by jax's topology-aware device assignment (rings/tori on TPU, NVLink
  islands on GPU). Axes are `Auto`: XLA's sharding propagation fills in what we leave open."""
  devices = list(devices if devices is not None else jax.devices())
  shape = config.shape(len(devices))
  config.resolved_rules()  # Validate early, before anything compiles.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_shardings(abstract_tree, logical_tree, mesh, rules):
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from logical specs, with a
  clear error when a dimension does not divide over its mesh axes."""
  specs = nn.logical_to_mesh(logical_tree, rules)

  def check(path, leaf, spec):
    for dim, axes in zip(leaf.shape, spec):
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
      if dim % size:
        raise UserError(f"{jax.tree_util.keystr(path)} has a dimension of {dim} that mesh axes "
                        f"{axes} (size {size}) cannot split evenly; change the mesh or rule set")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(check, abstract_tree, specs)


def _axes_size(axes, mesh) -> int:
  """Devices that one dimension is split over (a spec entry: None, an axis, or a tuple)."""
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes if a is not None]))


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                              param_shardings, mesh, abstract_params):
  """Where each optimizer-state leaf lives, from its parameter's sharding and shape.

  The state's layout (jaxlm.optim.state_layout) ties each leaf to its parameter. Then:
  - a leaf of its parameter's shape (Adam's moments) takes the parameter's sharding;
  - otherwise (factored moments, low-rank projectors and moments) each leaf dimension is
    aligned with the first parameter dimension of its size after the previously aligned one
    (dropped or shrunk dimensions are skipped; ties between equal sizes go to the earlier
    dimension), and keeps that dimension's mesh axes if its size divides over them;
  - every other dimension, scalars and leaves tied to no parameter are replicated.
  """
  shardings = {path_name(path): sharding for path, sharding in jax.tree_util.tree_flatten_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
  shapes = {name: tuple(leaf.shape) for name, leaf in flatten_names(abstract_params).items()}
  leaves, state_treedef = jax.tree.flatten(abstract_opt_state)

  def place(leaf, tag):
    if tag.param is None:
      return NamedSharding(mesh, PartitionSpec(*[None] * leaf.ndim))
    return _leaf_sharding(tuple(leaf.shape), shapes[tag.param], shardings[tag.param], mesh)

  layout = state_layout(abstract_opt_state, abstract_params, tx)
  return state_treedef.unflatten([place(leaf, tag) for leaf, tag in zip(leaves, layout)])


def _leaf_sharding(shape, param_shape, sharding, mesh) -> NamedSharding:
  if shape == param_shape:
    return sharding
  spec = tuple(sharding.spec) + (None,) * (len(param_shape) - len(sharding.spec))
  dims = _align(shape, param_shape)
  spec_of_leaf = PartitionSpec(*[
      spec[d] if d is not None and size % _axes_size(spec[d], mesh) == 0 else None
      for size, d in zip(shape, dims)])
  return sharding if spec_of_leaf == sharding.spec else NamedSharding(mesh, spec_of_leaf)


def _align(shape, param_shape) -> list[int | None]:
  """For each leaf dimension, the parameter dimension it matches in an in-order alignment by
  size, or None: a factored moment drops dimensions, a low-rank one shrinks them."""
  dims, next_dim = [], 0
  for size in shape:
    match = next((d for d in range(next_dim, len(param_shape)) if param_shape[d] == size), None)
    dims.append(match)
    next_dim = next_dim if match is None else match + 1
  return dims


def batch_sharding(mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assemble this host's rows into one global jax.Array per field (multi-host aware)."""
  num_hosts = jax.process_count()
  return {name: jax.make_array_from_process_local_data(
      sharding, array, (array.shape[0] * num_hosts, *array.shape[1:]))
          for name, array in local_batch.items()}


def host_rows(batch: dict) -> dict:
  """This process's contiguous block of a batch every host holds whole (eval batches)."""
  count, index = jax.process_count(), jax.process_index()
  rows = next(iter(batch.values())).shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def per_device_bytes(tree) -> int:
  """Bytes of `tree` held by one device (the first addressable one)."""
  device = jax.local_devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-host start-up through `jax.distributed` (JAX's own SPMD runtime).

  initialize=None (auto) starts it when a coordinator address is given here or in
  $JAX_COORDINATOR_ADDRESS, or when Slurm reports more than one task; True always starts it
  (letting jax detect a TPU pod or other cluster); False never does.
  """
  initialize: bool | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    check_field_types(self)
    check_range("DistributedConfig.num_processes", self.num_processes, low=1, integer=True,
                optional=True)
    check_range("DistributedConfig.process_id", self.process_id, low=0, integer=True,
                optional=True)


def initialize_distributed(config: DistributedConfig) -> bool:
  wanted = config.initialize
  if wanted is None:
    wanted = bool(config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                  or int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if not wanted or jax.distributed.is_initialized():
    return False
  # CPU processes need a collectives backend to talk to each other; harmless elsewhere.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address, num_processes=config.num_processes,
      process_id=config.process_id,
      local_device_ids=list(config.local_device_ids) if config.local_device_ids else None)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
