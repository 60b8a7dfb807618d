"""SLTrain's weights (Han et al. 2406.02214): a matrix stored as a low-rank product plus a sparse
matrix on a fixed random support, and formed whole only inside the step.

    W = (alpha / rank) * lowrank_in @ lowrank_out + S

For a weight whose input axes (the ones its Role reads) hold `n_in` numbers and whose output
axes hold `n_out`, the params are three arrays under the weight's own key:

    lowrank_in  [*input dims, rank]    Kaiming-uniform, bound 1/sqrt(n_in) (the authors' A)
    lowrank_out [rank, *output dims]   zeros (the authors' B), so W starts as S
    values      [int(density * n_in * n_out)]   S's entries, uniform in +-1/sqrt(n_in)

S's support (where `values` go in the flattened W) is drawn once from
(ModelConfig.sltrain_seed, the weight's path, its size) and never changes: it is a constant of
the compiled step, sorted int32 indices, never a dense mask. The dense W is formed where the
forward pass uses it and formed again in the backward pass (`factored_einsum`'s own VJP), so
no W is kept from the forward pass for the backward one, and W's gradient goes straight into
the factors' and the values'.

ModelConfig.parameterization = "low_rank" is the same without S (`values` holds no entry): the
paper's low-rank-only baseline.
"""

import dataclasses
import functools
import math
import zlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.config import ModelConfig


class FactoredWeight(NamedTuple):
  """One weight's SLTrain params (a pytree): see the module doc."""
  lowrank_in: jax.Array
  lowrank_out: jax.Array
  values: jax.Array


FACTOR_KEYS = FactoredWeight._fields
SPARSE_VALUES = "values"  # S's entries: 1-D, yet a matrix's (weight decay applies to them).


@dataclasses.dataclass(frozen=True)
class Support:
  """Which entries of a flattened weight of `size` numbers S holds: `count` of them, drawn from
  (seed, path) without replacement. Hashable, so a compiled step keys on it."""
  seed: int
  path: str
  size: int
  count: int

  @property
  def indices(self) -> np.ndarray:
    return support_indices(self.seed, self.path, self.size, self.count)


@functools.lru_cache(maxsize=1024)
def support_indices(seed: int, path: str, size: int, count: int) -> np.ndarray:
  """`count` distinct sorted indices in [0, size), the same in every process and on every host
  (numpy's generator seeded by the seed and a CRC of the path, not Python's hash)."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  indices = np.sort(rng.choice(size, count, replace=False)).astype(np.int32)
  indices.flags.writeable = False
  return indices


def support_count(config: ModelConfig, size: int) -> int:
  """S's entries in a weight of `size` numbers: int(density * size), as the authors round it;
  none for the low-rank-only parameterization."""
  return int(config.sltrain_density * size) if config.parameterization == "sltrain" else 0


def form_weight(factors: FactoredWeight, support: Support, scale: float):
  """The dense W, in the factors' dtype."""
  rank = factors.lowrank_in.shape[-1]
  in_shape, out_shape = factors.lowrank_in.shape[:-1], factors.lowrank_out.shape[1:]
  low_rank = (factors.lowrank_in.reshape(-1, rank) @ factors.lowrank_out.reshape(rank, -1)) * scale
  flat = low_rank.reshape(-1).at[support.indices].add(factors.values, indices_are_sorted=True,
                                                      unique_indices=True)
  return flat.reshape(*in_shape, *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def factored_einsum(spec: str, support: Support, scale: float, x, factors: FactoredWeight):
  """jnp.einsum(spec, x, W) with W formed from `factors` (in x's dtype); the backward pass forms
  W again instead of keeping it."""
  return jnp.einsum(spec, x, form_weight(factors, support, scale).astype(x.dtype))


def _factored_einsum_forward(spec, support, scale, x, factors):
  return factored_einsum(spec, support, scale, x, factors), (x, factors)


def _factored_einsum_backward(spec, support, scale, residuals, dy):
  x, factors = residuals
  w, form_vjp = jax.vjp(lambda f: form_weight(f, support, scale).astype(x.dtype), factors)
  _, einsum_vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
  dx, dw = einsum_vjp(dy)
  return dx, form_vjp(dw)[0]


factored_einsum.defvjp(_factored_einsum_forward, _factored_einsum_backward)


@dataclasses.dataclass(frozen=True)
class SLTrainMatrix:
  """What a module multiplies by: the factors with the constants that form W from them."""
  factors: FactoredWeight
  support: Support
  scale: float

  def einsum(self, spec: str, x):
    return factored_einsum(spec, self.support, self.scale, x, self.factors)

  def dense(self):
    return form_weight(self.factors, self.support, self.scale)


def sltrain_matrix(config: ModelConfig, name: str, factors) -> SLTrainMatrix:
  """The weight at param path `name` ("layer_0/mlp/up") of an SLTrain model, from its factors
  (a FactoredWeight or the params' {factor: array})."""
  factors = FactoredWeight(**factors) if isinstance(factors, dict) else factors
  size = math.prod(factors.lowrank_in.shape[:-1]) * math.prod(factors.lowrank_out.shape[1:])
  return SLTrainMatrix(factors, Support(config.sltrain_seed, name, size, factors.values.shape[0]),
                       config.sltrain_alpha / config.sltrain_rank)


def _uniform(bound: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class SparsePlusLowRank(nn.Module):
  """The params of one SLTrain weight of `shape`, whose first `num_inputs` axes are its input
  (see the module doc); calling it gives the SLTrainMatrix."""
  config: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  num_inputs: int

  @nn.compact
  def __call__(self) -> SLTrainMatrix:
    cfg = self.config
    in_shape, out_shape = self.shape[:self.num_inputs], self.shape[self.num_inputs:]
    in_axes, out_axes = self.axes[:self.num_inputs], self.axes[self.num_inputs:]
    rank = cfg.sltrain_rank
    bound = 1 / math.sqrt(math.prod(in_shape))  # Kaiming-uniform, a = sqrt(5): torch's Linear.
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
    factors = FactoredWeight(
        param("lowrank_in", _uniform(bound), (*in_shape, rank), (*in_axes, "rank")),
        param("lowrank_out", nn.initializers.zeros, (rank, *out_shape), ("rank", *out_axes)),
        param("values", _uniform(bound), (support_count(cfg, math.prod(self.shape)),),
              ("support",)))
    # The path from the model's root (the Decoder): the support's seed, the same in the
    # `sltrain_to_dense` transition, which forms W from the params tree.
    return sltrain_matrix(cfg, "/".join(self.scope.path), factors)
