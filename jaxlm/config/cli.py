"""What the command-line entry points share (train, eval, generate): gin flags (T5X's
--gin.NAME=VALUE shorthand), logging, and bad input as one line on stderr with exit code 2."""

import argparse
import logging
import sys
from typing import Callable

from jaxlm.config import gin_config
from jaxlm.config import gin_usage
from jaxlm.errors import UserError

EXIT_USER_ERROR = 2


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding such as \"Stage.num_steps = 100\" (repeatable)")
  parser.add_argument("--gin_defaults", action="append", dest="gin_bindings",
                      type=gin_usage.SharedDefault,
                      help="a binding that sets a default shared by several runs (as files "
                           "under gin/ do): unused, it is a warning, not an error (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="extra folder to resolve gin files and includes in (repeatable)")


def parse_with_gin_flags(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """parser.parse_args, plus --gin.NAME=VALUE arguments appended to args.gin_bindings."""
  args, rest = parser.parse_known_args(argv)
  for arg in rest:
    if not (arg.startswith("--gin.") and "=" in arg):
      parser.error(f"unrecognized argument {arg!r}; bindings look like --gin.NAME=VALUE")
    name, value = arg[len("--gin."):].split("=", 1)
    args.gin_bindings.append(f"{name} = {value}")
  return args


def setup_logging() -> None:
  """Our own INFO lines only: gin, absl and orbax log chatty INFO records on the root logger."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("jaxlm").setLevel(logging.INFO)


def fail(message: str, code: int = EXIT_USER_ERROR) -> int:
  print(f"jaxlm: error: {message.splitlines()[0]}", file=sys.stderr)
  return code


def run_guarded(body: Callable[[], int]) -> int:
  """body()'s exit code; a UserError (or gin's unset macro / missing binding) is one line and
  exit code 2."""
  try:
    return body()
  except UserError as e:
    return fail(str(e))
  except (TypeError, RuntimeError) as e:  # gin reports unset macros and bindings at call time.
    message = gin_config.explain_unset_macro(e) or gin_config.explain_missing_bindings(e)
    if message is None:
      raise
    return fail(message)
