"""The model's anatomy: every param of a config's tree, with what it is and what its axes mean.

    parts = anatomy(config)                 # one Part per param leaf, in tree order
    parts["layer_0/mlp/up"].kind            # "mlp.up"
    parts["layer_0/attention/out"].reads    # ("heads", "head_dim"): its input axes
    parts.of_kind("head"), parts.blocks, parts.block_key(3), parts.matmuls

Growth, sparsity, vocabulary expansion, the FLOPs count and Hugging Face interop read params
through this, never by literal keys, so a new block variant (another MLP, an MoE layer) works
with them by declaring its modules' `PARTS` (jaxlm.model.layers.Role). Only this module and the
modules themselves know the keys.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import numpy as np

from jaxlm.errors import UserError
from jaxlm.model.attention import Attention
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import Embed, RMSNorm, Role
from jaxlm.model.sparse_plus_low_rank import FACTOR_KEYS
from jaxlm.model.transformer import Decoder, block_mlp

_BLOCK = re.compile(r"layer_(\d+)")


@dataclasses.dataclass(frozen=True)
class Part:
  """One param leaf: where it is, its shape, the logical axis of each dimension, and its Role."""
  path: tuple[str, ...]  # Keys from the params' root: ("layer_0", "mlp", "up").
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  role: Role
  block: int | None  # The block it belongs to; None for the embedding, final norm and head.
  # "dense": the leaf is the matrix; "sltrain" or "low_rank" (ModelConfig.parameterization): the
  # path holds its factors (jaxlm/model/sparse_plus_low_rank.py), and shape and axes are the
  # matrix they form.
  stored: str = "dense"

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def kind(self) -> str:
    return self.role.kind

  @property
  def reads(self) -> tuple[str, ...]:
    return self.role.reads

  @property
  def writes(self) -> tuple[str, ...]:
    """The axes of the activation it produces (those it does not read)."""
    return tuple(a for a in self.axes if a not in self.role.reads)

  @property
  def input_dims(self) -> tuple[int, ...]:
    """Positions of the axes it reads (N:M groups run along them)."""
    return tuple(i for i, a in enumerate(self.axes) if a in self.role.reads)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def get(self, tree):
    """This part's leaf in a param-shaped tree (params, a moment, a gradient). An SLTrain
    weight has no such leaf: what reads it as a matrix is refused in one line."""
    if self.stored != "dense":
      raise UserError(f"this operation reads {self.name} as a dense matrix, but the model "
                      f"stores it as {self.stored} factors (ModelConfig.parameterization); "
                      "make the model dense first with the `sltrain_to_dense` transition")
    return self.stored_in(tree)

  def stored_in(self, tree):
    """What `tree` holds at this part's path: the leaf, or an SLTrain weight's {factor: leaf}."""
    for key in self.path:
      tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class Anatomy:
  config: ModelConfig
  parts: tuple[Part, ...]

  def __iter__(self):
    return iter(self.parts)

  def __getitem__(self, name: str | tuple) -> Part:
    name = name if isinstance(name, str) else "/".join(name)
    try:
      return self._by_name[name]
    except KeyError:
      raise KeyError(f"the model has no param {name!r}; it has {sorted(self._by_name)[:4]}...") \
          from None

  def get(self, name: str | tuple) -> Part | None:
    return self._by_name.get(name if isinstance(name, str) else "/".join(name))

  @functools.cached_property
  def _by_name(self) -> dict[str, Part]:
    return {p.name: p for p in self.parts}

  def of_kind(self, kind: str, block: int | None = None) -> list[Part]:
    return [p for p in self.parts if p.kind == kind and (block is None or p.block == block)]

  def one(self, kind: str, block: int | None = None) -> Part | None:
    found = self.of_kind(kind, block)
    if len(found) > 1:
      raise ValueError(f"the model has {len(found)} params of kind {kind!r}: {found}")
    return found[0] if found else None

  @property
  def num_blocks(self) -> int:
    return self.config.num_layers

  @staticmethod
  def block_key(index: int) -> str:
    """The key under the params' root that holds block `index`."""
    return f"layer_{index}"

  @staticmethod
  def block_index(key: str) -> int | None:
    """The block a root key holds, or None (embedding, final norm, head)."""
    match = _BLOCK.fullmatch(str(key))
    return int(match.group(1)) if match else None

  def block_parts(self, index: int) -> list[Part]:
    return [p for p in self.parts if p.block == index]

  @property
  def matmuls(self) -> list[Part]:
    """Params that multiply every token's activation: the blocks' matrices and the output head
    (the tied embedding table when there is no separate head)."""
    found = [p for p in self.parts if p.role.matmul]
    if self.config.tie_embeddings:
      found += self.of_kind("embedding")
    return found

  @property
  def block_matmuls(self) -> list[Part]:
    """The blocks' matrices that sparsity methods mask by default (all but an MoE router)."""
    return [p for p in self.parts if p.role.matmul and p.role.prunable and p.block is not None]

  def blocks_in(self, tree) -> list[str]:
    """The block keys of a param-shaped `tree` (of this model's kind, any depth), in order."""
    return sorted((k for k in tree if self.block_index(k) is not None), key=self.block_index)

  def sizes(self, tree) -> dict[str, int]:
    """The size of every logical axis of a block, and "layers", read from a param-shaped tree of
    this model's kind (whatever widths and depth it has now)."""
    found = {}  # Block 0's sizes first: an MoE block's experts may be narrower than its MLP.
    for index in range(min(self.num_blocks, len(self.blocks_in(tree)))):
      for part in self.block_parts(index):
        for axis, size in zip(part.axes, part.get(tree).shape):
          found.setdefault(axis, size)
    return {**found, "layers": len(self.blocks_in(tree))}

  def residual_writers(self, index: int) -> list[Part]:
    """Block `index`'s matrices that write the residual stream (attention out, the MLP's down):
    zero them and the block adds nothing."""
    return [p for p in self.block_parts(index) if p.role.matmul and "embed" in p.writes]


def _roles(config: ModelConfig, block: int | None) -> dict:
  """The modules' PARTS under the root's keys, or under block `block`'s (its MLP as
  ModelConfig.mlp and moe_layers say)."""
  if block is None:
    return {"embed": Embed.PARTS, "final_norm": RMSNorm.PARTS,
            "lm_head": Decoder.PARTS["lm_head"]}
  return {"attention": Attention.PARTS, "attention_norm": RMSNorm.PARTS,
          "mlp": block_mlp(config, block).PARTS, "mlp_norm": RMSNorm.PARTS}


def _role(path: tuple[str, ...], config: ModelConfig) -> tuple[Role, int | None, str | None]:
  """The Role of the param at `path`, its block, and which SLTrain factor of it the leaf is."""
  block = Anatomy.block_index(path[0])
  node = _roles(config, block)
  keys = path[1:] if block is not None else path
  for i, key in enumerate(keys):
    if isinstance(node, Role) and i == len(keys) - 1 and key in FACTOR_KEYS:
      return node, block, key
    node = node.get(key) if isinstance(node, dict) else None
  if not isinstance(node, Role):
    raise UserError(f"the param {'/'.join(path)} has no Role: its module must declare it in "
                    "PARTS (jaxlm.model.layers.Role)")
  return node, block, None


@functools.lru_cache(maxsize=64)
def anatomy(config: ModelConfig) -> Anatomy:
  """Every param of `config`'s model, from its abstract init (no compute)."""
  boxed = jax.eval_shape(lambda: Decoder(config).init(
      jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
  parts, factored = [], {}
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for key_path, leaf in leaves:
    path = tuple(str(k.key) for k in key_path)
    role, block, factor = _role(path, config)
    if factor is None:
      parts.append(Part(path, tuple(leaf.value.shape), tuple(leaf.names), role, block))
      continue
    factors = factored.setdefault(path[:-1], {})
    factors[factor] = leaf
    if len(factors) == len(FACTOR_KEYS):  # The matrix they form: input axes, then output.
      low_in, low_out = factored.pop(path[:-1])["lowrank_in"], factors["lowrank_out"]
      parts.append(Part(path[:-1], low_in.value.shape[:-1] + low_out.value.shape[1:],
                        tuple(low_in.names[:-1]) + tuple(low_out.names[1:]), role, block,
                        stored=config.parameterization))
  return Anatomy(config, tuple(parts))
