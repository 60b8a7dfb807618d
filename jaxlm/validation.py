"""Checks that every configurable runs on its values when it is built, so that a bad value is one
line naming the field and what it may be, raised before a run touches MODEL_DIR.

    @gin.configurable
    @dataclasses.dataclass(frozen=True)
    class TrainerConfig:
      log_every: int = 10
      def __post_init__(self):
        check_field_types(self)                      # int / float / bool / str (| None) fields
        check_range("TrainerConfig.log_every", self.log_every, low=1)

Factories (optimizers, schedules) call `check_range` on their arguments the same way.
"""

import dataclasses
import math
import types
import typing

from jaxlm.errors import UserError

_SIMPLE = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


def _accepts(kind: type, value) -> bool:
  if kind is float:  # An int is a fine float; a bool is neither (True == 1 hides typos).
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def _simple_kinds(annotation) -> tuple[list[type], bool] | None:
  """(kinds, None allowed) for `int`, `float | None`, `typing.Optional[str]`, ...; None for
  annotations this module does not check (Any, Callable, containers)."""
  if annotation in _SIMPLE:
    return [annotation], False
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    args = typing.get_args(annotation)
    kinds = [a for a in args if a is not type(None)]
    if all(k in _SIMPLE for k in kinds):
      return kinds, type(None) in args
  return None


def check_field_types(instance) -> None:
  """Every field annotated with int, float, bool or str (optionally `| None`) holds one."""
  owner = type(instance).__name__
  for field in dataclasses.fields(instance):
    found = _simple_kinds(field.type)
    if found is None:
      continue
    kinds, optional = found
    value = getattr(instance, field.name)
    if (value is None and optional) or any(_accepts(k, value) for k in kinds):
      continue
    wanted = " or ".join(_SIMPLE[k] for k in kinds) + (" or None" if optional else "")
    raise UserError(f"{owner}.{field.name} must be {wanted}, got {value!r} "
                    f"({type(value).__name__}); fix the binding {owner}.{field.name}")


def check_range(name: str, value, *, low=None, high=None, low_open: bool = False,
                high_open: bool = False, optional: bool = False, integer: bool = False) -> None:
  """`value` is a finite number (an integer if `integer`) within [low, high] (ends opened by
  low_open / high_open), or None when `optional`. `name` is the binding, e.g. 'adamw.b1'."""
  if value is None and optional:
    return
  kind = int if integer else float
  interval = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", " +
              ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]"))
  wanted = f"{_SIMPLE[kind]} in {interval}" + (" or None" if optional else "")
  ok = _accepts(kind, value) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    raise UserError(f"{name} must be {wanted}, got {value!r}; fix the binding {name}")


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise UserError(f"{name} must be one of {list(choices)}, got {value!r}; fix the binding "
                    f"{name}")
