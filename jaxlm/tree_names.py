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


def get_named(tree, name: str):
  """The leaf of a nested-dict tree named "layer_0/mlp/up"."""
  for key in name.split("/"):
    tree = tree[key]
  return tree


def replace_named(tree, values: dict):
  """`tree` with the leaves named in `values` ({"layer_0/mlp/up": new leaf}) replaced."""
  def swap(path, leaf):
    return values.get(path_name(path), leaf)
  return jax.tree_util.tree_map_with_path(swap, tree)


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) for name, leaf in flatten_names(tree).items()}


def first_difference(have: dict, want: dict, have_label: str, want_label: str) -> str | None:
  """The first tensor (params before optimizer state) missing, extra or of another shape in
  `have` against `want` ({name: shape}), in words; None if they agree."""
  for name in sorted(set(have) | set(want), key=lambda k: (not k.startswith("params/"), k)):
    if name not in have:
      return f"{name!r} {want[name]} is missing {have_label} but needed {want_label}"
    if name not in want:
      return f"{name!r} {have[name]} is {have_label} but not {want_label}"
    if have[name] != want[name]:
      return f"{name!r} is {have[name]} {have_label} but {want[name]} {want_label}"
  return None
