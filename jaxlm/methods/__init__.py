"""Methods: pure functions on pytrees that plug into a stage through its transitions
(transition.py) and the step hooks of `Method` (hooks.py). They never import the trainer. The
method families are the packages FAMILIES lists: continual/, growth/, sparsity/."""

from jaxlm.methods.hooks import Method, MethodHooks

# Every method family, in one place: importing one registers its gin configurables (its
# transitions and methods), which gin must know before it parses a config
# (config/gin_config.py imports them).
FAMILIES = ("jaxlm.methods.continual", "jaxlm.methods.growth", "jaxlm.methods.sparsity")

__all__ = ["FAMILIES", "Method", "MethodHooks"]
