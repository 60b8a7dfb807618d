"""Names for the leaves of a train state: "params/layer_3/mlp/up", "opt_state/1/0/mu/embed/...".

The same name for a namedtuple field and a dict key of that name, so that a live state, its
ShapeDtypeStructs and a checkpoint restored without a target (dicts and lists) line up.
"""

import jax


def path_name(path) -> str:
  """A key path as "a/b/0/c", the same for a namedtuple field and a dict key of that name (a
  checkpoint restored without a target has dicts where the live state has namedtuples)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def flatten_names(tree) -> dict:
  """{"params/layer_0/mlp/up": leaf, ...} for a state, a restored checkpoint or their shapes."""
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if leaf is not None}
