"""Methods: pure functions on pytrees that plug into a stage through transitions (stages.py) and
the step hooks of `Method` (hooks.py). The method families live here as they are built."""

from jaxlm.methods.hooks import Method, MethodHooks

__all__ = ["Method", "MethodHooks"]
