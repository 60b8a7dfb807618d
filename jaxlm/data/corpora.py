"""The built-in corpus: text and code that ship with every Python installation.

It needs no download, so tests, quickstarts and benchmarks run on any machine:
  - "code":  the standard library's own `.py` sources, one document per file;
  - "prose": the language reference shipped for `help()` (`pydoc_data.topics`), one per topic.
The documents are built once and cached as JSON lines, keyed by the Python version (the stdlib
differs between versions) and by a rules version (bump it when the selection below changes).
"""

import json
import logging
import os
import pathlib
import platform
import sysconfig
import tempfile

from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")

_RULES_VERSION = "v1"

# Test suites are mostly fixtures and generated cases, idlelib is a GUI application; pydoc_data
# holds the "prose" domain as string literals, so keeping it would put prose into "code".
_SKIPPED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
    "pydoc_data", "lib-dynload",
})


def _is_code_document(relative_path: pathlib.PurePath) -> bool:
  dirs = relative_path.parts[:-1]
  if any(d in _SKIPPED_DIRS or d.startswith("config-") for d in dirs):
    return False
  # Machine-generated build settings, not code anyone wrote.
  return not relative_path.name.startswith("_sysconfigdata")


def _stdlib_code_documents() -> list[str]:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = sorted(p for p in stdlib.rglob("*.py") if _is_code_document(p.relative_to(stdlib)))
  if not paths:
    raise UserError(f"found no .py files under the standard library at {stdlib}; "
                    'use the "prose" domain or text_files instead')
  return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def _pydoc_prose_documents() -> list[str]:
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError('this Python installation lacks pydoc_data (the "prose" domain); '
                    'use domains=("code",) or text_files instead') from e
  return [topics[key] for key in sorted(topics)]


# Looked up at call time, so a test can swap a builder out.
_BUILDERS = {"code": _stdlib_code_documents, "prose": _pydoc_prose_documents}
DOMAINS = tuple(_BUILDERS)


def default_cache_dir() -> pathlib.Path:
  """`$JAXLM_CACHE_DIR`, else `~/.cache/jaxlm`."""
  return pathlib.Path(os.environ.get("JAXLM_CACHE_DIR") or
                      pathlib.Path.home() / ".cache" / "jaxlm")


def cache_path(domain: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  directory = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  name = f"builtin-{_RULES_VERSION}-py{platform.python_version()}-{domain}.jsonl"
  return directory / name


def _write_atomically(path: pathlib.Path, documents: list[str]) -> None:
  """Writes a temporary file and renames it, so a crash never leaves a partial cache."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for document in documents:
        f.write(json.dumps(document) + "\n")  # ASCII-escaped: one document per physical line.
    os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a cache is ordinary data.
    os.replace(tmp_name, path)
  except BaseException:
    os.unlink(tmp_name)
    raise


def _read_cache(path: pathlib.Path) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def builtin_documents(domain: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
  """Returns the documents of one built-in domain, building and caching them on first use."""
  if domain not in _BUILDERS:
    raise UserError(f"unknown built-in corpus domain {domain!r}; choose from {list(DOMAINS)}")
  path = cache_path(domain, cache_dir)
  if path.exists():
    return _read_cache(path)
  documents = _BUILDERS[domain]()
  try:
    _write_atomically(path, documents)
    logger.info("cached built-in %r corpus (%d documents) at %s", domain, len(documents), path)
  except OSError as e:
    # The corpus is still usable; only the next start gets slower.
    logger.warning("could not cache the built-in corpus at %s (%s); set JAXLM_CACHE_DIR to a "
                   "writable directory", path, e)
  return documents
