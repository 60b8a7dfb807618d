"""Methods: pure functions on pytrees that plug into a stage through transitions (stages.py) and
the step hooks of `Method` (hooks.py). The method families are the packages FAMILIES lists."""

import importlib

from jaxlm.methods.hooks import Method, MethodHooks

# Every method family, in one place: importing one registers its gin configurables (its
# transitions and methods), which gin must know before it parses a config.
FAMILIES = ("jaxlm.continual", "jaxlm.growth", "jaxlm.sparsity")


def import_families() -> None:
  for family in FAMILIES:
    importlib.import_module(family)


__all__ = ["FAMILIES", "Method", "MethodHooks", "import_families"]
