"""No gin binding is silently ignored: every binding must be read by some call by the time the
pre-flight has built the run.

gin records the parameters each configurable call received (its operative config). A binding
`scope/name.param` is used when some call of `name` in a scope that reaches it (`scope` is a
prefix of the call's scope) took `param` from it, and no more specific binding (a longer
scope) shadowed it there; gin resolves bindings the same way. A binding nothing reads is
refused with one line: where it was set and the likely fix (trainer.run calls `check_used`
after the pre-flight, before anything in MODEL_DIR is written).

Two kinds of binding set defaults that a given run may not call, and are listed as a warning
instead: those in files under the repository's gin/ (building blocks such as
gin/runs/pretrain.gin) and those given with --gin_defaults (tools/reproduce.py passes a
family's shared bindings that way). Everything else -- experiment files, files they include
from anywhere but gin/, --gin.NAME=VALUE and --gin_bindings -- is refused.
"""

import dataclasses
import logging
import os
from pathlib import Path

import gin
from gin import config_parser

from jaxlm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDING_BLOCKS = REPO_ROOT / "gin"
MACRO = "gin.macro"

log = logging.getLogger("jaxlm")

# (scope, complete selector, parameter): gin's own key for a binding; a macro NAME = v is
# (NAME, "gin.macro", "value").
Key = tuple[str, str, str]


class SharedDefault(str):
  """A command-line binding that sets a default for several runs (--gin_defaults): unused, it
  is a warning, not an error."""


@dataclasses.dataclass(frozen=True)
class Source:
  where: str  # "experiments/growth/growlength.gin, line 21" or "--gin binding 'X = 1'"
  shared: bool  # A building block under gin/ or a --gin_defaults binding.


_sources: dict[Key, Source] = {}


def _key(scope: str, selector: str, param: str) -> Key | None:
  if not param:  # A macro: NAME = value.
    return (f"{scope}/{selector}" if scope else selector, MACRO, "value")
  try:
    parsed = gin.config.ParsedBindingKey.parse((scope, selector, param))
  except ValueError:
    return None  # Unknown to gin: the parse itself has already refused it.
  return (*parsed.config_key, param)


def _shown(path: str) -> str:
  path = os.path.abspath(path)
  return os.path.relpath(path, REPO_ROOT) if path.startswith(str(REPO_ROOT) + os.sep) else path


def _statements(text_or_file):
  return config_parser.ConfigParser(text_or_file, gin.config.ParserDelegate(skip_unknown=True))


def record_sources(files: list[str], bindings: list[str], resolve) -> None:
  """Where each binding of the config just parsed was set: `files` (resolved paths) and their
  includes (`resolve(name)` finds an include as the parse did), then `bindings`; a later
  setting of the same key replaces the earlier one, as it does in gin."""
  _sources.clear()
  seen = set()

  def read_file(path: str) -> None:
    if path in seen:
      return
    seen.add(path)
    shared = Path(path).resolve().is_relative_to(BUILDING_BLOCKS)
    with open(path, encoding="utf-8") as f:
      for statement in _statements(f):
        if isinstance(statement, config_parser.IncludeStatement):
          read_file(resolve(statement.filename))
        elif isinstance(statement, config_parser.BindingStatement):
          key = _key(statement.scope, statement.selector, statement.arg_name)
          if key:
            _sources[key] = Source(f"{_shown(path)}, line {statement.location.line_num}", shared)

  for path in files:
    read_file(path)
  for text in bindings:
    shared = isinstance(text, SharedDefault)
    flag = "--gin_defaults" if shared else "command-line"
    for statement in _statements(str(text)):
      if isinstance(statement, config_parser.BindingStatement):
        key = _key(statement.scope, statement.selector, statement.arg_name)
        if key:
          _sources[key] = Source(f"{flag} binding {str(text).strip()!r}", shared)


def _reaches(binding_scope: str, call_scope: str) -> bool:
  """A binding in `binding_scope` applies to calls in `call_scope` (gin: scope prefixes)."""
  outer, inner = binding_scope.split("/") if binding_scope else [], call_scope.split("/")
  return not outer or inner[:len(outer)] == outer


def used_bindings() -> set[Key]:
  """The bindings some configurable call took a value from (gin's operative config)."""
  config = gin.config._CONFIG  # pylint: disable=protected-access  (gin has no public reader)
  used = set()
  for (call_scope, selector), params in gin.config._OPERATIVE_CONFIG.items():  # pylint: disable=protected-access
    parts = call_scope.split("/") if call_scope else []
    for param in params:
      for i in range(len(parts), -1, -1):  # The most specific binding wins, as in gin.
        scope = "/".join(parts[:i])
        if param in config.get((scope, selector), {}):
          used.add((scope, selector, param))
          break
  return used


def unused_bindings() -> list[Key]:
  used = used_bindings()
  return [(scope, selector, param)
          for (scope, selector), params in gin.config._CONFIG.items()  # pylint: disable=protected-access
          for param in params if (scope, selector, param) not in used]


def describe(key: Key) -> str:
  """One line: the binding, where it was set, why nothing used it, and the likely fix."""
  scope, selector, param = key
  source = _sources.get(key)
  where = source.where if source else "set in Python"
  if selector == MACRO:
    return (f"gin macro {scope} ({where}) is never used: no binding that the run reads refers "
            f"to %{scope}; remove it or refer to it")
  name, shown = selector.rsplit(".", 1)[-1], _short(key)
  operative = gin.config._OPERATIVE_CONFIG  # pylint: disable=protected-access
  calls = sorted({s for s, sel in operative if sel == selector})
  scopes = ", ".join(repr(s) if s else "unscoped" for s in calls)
  in_use = sorted({part for s, sel in operative if sel != MACRO for part in s.split("/") if part})
  if scope and scope.split("/")[0] not in in_use:
    why = f"nothing in this run is built in scope {scope.split('/')[0]!r}"
    fix = f"scopes in this run: {in_use or 'none'}; fix the scope or remove the binding"
  elif not calls:
    why = f"nothing in this run calls {name}"
    fix = _fix_for(scope, name, selector) or "check the name, or remove the binding"
  elif not any(_reaches(scope, s) for s in calls):
    why = f"{name} is called only {'unscoped' if calls == [''] else f'in scopes {scopes}'}"
    fix = _fix_for(scope, name, selector) or "bind it in one of those scopes, or remove it"
  else:
    why = (f"every call of {name} in scope {scope or 'unscoped'!r} gets {param} from the code "
           "or from a binding in a narrower scope")
    fix = "remove the binding"
  return f"gin binding {shown} ({where}) is never used: {why}; {fix}"


def _fix_for(scope: str, name: str, selector: str) -> str | None:
  """For a stage's schedule or optimizer bound in the stage's scope but not selected there."""
  field = {"jaxlm.optim.schedules": "schedule", "jaxlm.optim.optimizers": "optimizer",
           "jaxlm.optim.matrix_optimizers": "optimizer"}.get(selector.rsplit(".", 1)[0])
  if not (field and scope):
    return None
  return f"if stage {scope!r} should use it, bind {scope}/Stage.{field} = @{scope}/{name}"


def check_used() -> None:
  """Refuses the first unused binding a user wrote (UserError); warns about unused defaults."""
  unused = unused_bindings()
  shared = [k for k in unused if k in _sources and _sources[k].shared]
  for key in shared:
    log.warning("%s (a shared default, so not an error)", describe(key))
  refused = [k for k in unused if k not in shared]
  if refused:
    others = ", ".join(_short(k) for k in refused[1:])
    raise UserError(describe(refused[0]) + (f" (also never used: {others})" if others else ""))


def _short(key: Key) -> str:
  scope, selector, param = key
  if selector == MACRO:
    return scope
  name = selector.rsplit(".", 1)[-1]
  return f"{scope}/{name}.{param}" if scope else f"{name}.{param}"
