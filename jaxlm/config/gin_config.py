"""gin files and bindings from the command line -> parsed config, with one-line errors.

Search paths make `include 'gin/models/tiny.gin'` work from any directory: the repository root
(where gin/ and experiments/ live), the current directory, $JAXLM_GIN_PATH (os.pathsep-separated)
and any --gin_search_paths.
"""

import difflib
import importlib
import inspect
import logging
import os
import re

import gin

from jaxlm import methods
from jaxlm.config import gin_usage
from jaxlm.errors import UserError

REPO_ROOT = gin_usage.REPO_ROOT


def search_paths(extra: list[str] = ()) -> list[str]:
  paths = [os.getcwd(), *extra, *filter(None, os.environ.get("JAXLM_GIN_PATH", "").split(os.pathsep))]
  if (REPO_ROOT / "gin").is_dir():
    paths.append(str(REPO_ROOT))
  return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def resolve_gin_file(name: str, paths: list[str]) -> str:
  if os.path.isfile(name):
    return os.path.abspath(name)
  for base in paths:
    candidate = os.path.join(base, name)
    if os.path.isfile(candidate):
      return candidate
  raise UserError(f"gin file {name!r} not found (looked in: {', '.join(paths)}); check the path "
                  "or add its folder with --gin_search_paths")


# Every module that defines gin configurables, in one place (gin must know them all before it
# parses a config): the trainer brings the run, its stages, data, model and optimizers; the
# kernels their block sizes; interop hf_model_config (a stage starting from a Hugging Face
# model); the optimizers that only a gin file names (GaLore, Muon); the method families their
# transitions and methods.
CONFIGURABLE_MODULES = ("jaxlm.training.trainer", "jaxlm.kernels.flash_attention", "jaxlm.interop",
                        "jaxlm.optim.matrix_optimizers", *methods.FAMILIES)


def register_configurables() -> None:
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)


def parse(gin_files: list[str], bindings: list[str], extra_search_paths: list[str] = (),
          base_config: str = "") -> None:
  """Parse `base_config` (a saved run's config text), then gin files, then bindings (later ones
  win), turning gin's errors into UserError. Where each binding was set is kept for
  gin_usage.check_used; a binding given as gin_usage.SharedDefault may go unused."""
  register_configurables()

  gin.clear_config()  # A fresh config per parse, so in-process callers (tests, tools) start clean.
  paths = search_paths(extra_search_paths)
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  # gin logs an ERROR for every search path an include is not in; the real failures raise.
  logging.disable(logging.ERROR)
  try:
    if base_config:
      gin.parse_config(base_config)
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except Exception as e:  # gin raises many types (incl. tokenize.TokenError) for bad text.  # pylint: disable=broad-except
    raise UserError(explain_gin_error(e)) from None
  finally:
    logging.disable(logging.NOTSET)
  gin_usage.record_sources(files, bindings, lambda name: resolve_gin_file(name, paths))


def explain_gin_error(error: Exception) -> str:
  """One line for a gin parse error, with a did-you-mean where we can make one."""
  text = str(error)
  first = text.splitlines()[0] if text else type(error).__name__
  unknown = re.search(r"No configurable matching '([^']+)'", text)
  param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
  if unknown:
    what = (f"unknown gin configurable {unknown.group(1)!r}"
            f"{_suggest(unknown.group(1), _configurable_names())}")
  elif param:
    what = (f"gin configurable {param.group(1)!r} has no parameter {param.group(2)!r}"
            f"{_suggest(param.group(2), _parameter_names(param.group(1)))}")
  elif isinstance(error, OSError) and "Unable to open file" in text:
    what = f"gin include failed: {first}"
  else:
    what = f"bad gin config: {first}"
  return what + _location(text)


def _location(text: str) -> str:
  in_file = re.search(r'In file "?([^",\n]+)"?, line (\d+)', text)
  if in_file:
    return f" (in {in_file.group(1)}, line {in_file.group(2)})"
  in_binding = re.search(r"In bindings string line \d+\n\s*(.+)", text)
  return f" (in binding {in_binding.group(1).strip()!r})" if in_binding else ""


def explain_unset_macro(error: TypeError) -> str | None:
  """gin reports an undefined %MACRO as a TypeError from its `macro` configurable at call time."""
  match = re.search(r"In call to configurable 'macro' .* in scope '([^']+)'", str(error))
  if not match:
    return None
  name = match.group(1)
  example = "'/tmp/run'" if name == "MODEL_DIR" else "VALUE"
  return f"gin macro {name} is used but never set; pass --gin.{name}=\"{example}\""


def explain_missing_bindings(error: Exception) -> str | None:
  """A required argument that no binding sets, as gin reports it at call time: "Required
  bindings for `F` not provided in config: [...]" (gin.REQUIRED) or a TypeError "missing 1
  required positional argument: 'path'" from configurable F (a dataclass field without default).
  """
  text = str(error)
  match = re.search(r"Required bindings for `([^`]+)` not provided in config: \[([^\]]*)\]", text)
  missing = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)", text)
  called = re.search(r"In call to configurable '([^']+)'", text)
  if match:
    function, names = match.group(1), re.findall(r"'([^']+)'", match.group(2))
  elif missing and called:
    function, names = called.group(1), re.findall(r"'([^']+)'", missing.group(1).splitlines()[0])
  else:
    return None
  example = ("include 'gin/runs/pretrain.gin' (see experiments/quickstart.gin)"
             if function == "run" else f"--gin.{function}.{names[0]}=VALUE")
  return (f"gin config never sets {', '.join(f'{function}.{n}' for n in names)}, which "
          f"{'is' if len(names) == 1 else 'are'} required; bind {'it' if len(names) == 1 else 'them'} "
          f"in a gin file or on the command line, e.g. {example}")


def _suggest(name: str, candidates: list[str]) -> str:
  close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def _configurable_names() -> list[str]:
  try:  # gin has no public listing of its registry; suggestions are a nicety, so stay defensive.
    selectors = list(gin.config._REGISTRY._selector_map)  # pylint: disable=protected-access
  except AttributeError:
    return []
  return sorted({s.rsplit(".", 1)[-1] for s in selectors} | set(selectors))


def _parameter_names(configurable: str) -> list[str]:
  try:
    target = gin.config._REGISTRY.get_match(configurable).wrapped  # pylint: disable=protected-access
    return list(inspect.signature(target).parameters)
  except (AttributeError, TypeError, ValueError):
    return []
