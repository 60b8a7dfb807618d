"""XLA's persistent compilation cache for the command-line entry points (train, eval, generate).

Every `python -m jaxlm.train` process compiles its steps afresh: on the CPU reproductions'
0.9M-parameter model the train step, the evaluation step, the initialisation and the peak-FLOP
probe take ~10 s of compilation, a tenth of a 600-step arm, and each arm of a family compiles
the same programs again (every seed, and every arm that shares the model; tools/reproduce.py's
arms use this cache too). JAX can keep the compiled executables on disk, keyed by the program,
the compile options, XLA's flags and the jax/jaxlib version, and load them in a later process
instead (what MaxText's `jax_cache_dir` turns on). A loaded executable is the same program, so
results are bitwise the same.

Where: `--compilation_cache=DIR` (default `$JAXLM_COMPILATION_CACHE`, else
`$XDG_CACHE_HOME/jaxlm/xla`, else `~/.cache/jaxlm/xla`), in a subfolder per host kind (machine,
CPU vector extensions): XLA:CPU executables are machine code for the CPU that compiled them, so
a home folder shared between different hosts keeps one set per kind. `--compilation_cache=none`
turns it off; a `JAX_COMPILATION_CACHE_DIR` in the environment is JAX's own setting and wins.
The folder is bounded at MAX_BYTES (least recently used entries go first; the bound needs
`filelock`, which also serialises concurrent readers and writers such as
`tools/reproduce.py --jobs=2`). Deleting the folder is always safe.

Before a host kind's folder is first used, one short subprocess checks that XLA:CPU here reads
back a program it wrote (kept in RELOAD_CHECK per jax version): on some Intel CPUs JAX 0.9-0.10
rejects every cached CPU program it reads (jax-ml/jax#38445, the loader takes LLVM's
+prefer-no-gather tuning for a missing CPU feature), so the cache there would only add an error
line per program; it is then left off, and a warning says so once per run.
"""

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys

from jaxlm.errors import UserError

DISABLED = "none"
ENVIRONMENT_VARIABLE = "JAXLM_COMPILATION_CACHE"
MAX_BYTES = 4 * 2**30
# Programs that compile faster than this are not worth a file (reading one costs a few ms).
MIN_COMPILE_SECONDS = 0.1
RELOAD_CHECK = "reload_check.json"

log = logging.getLogger("jaxlm")


def default_directory() -> str:
  if os.environ.get(ENVIRONMENT_VARIABLE):
    return os.environ[ENVIRONMENT_VARIABLE]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxlm", "xla")


def host_kind() -> str:
  """A folder name for this kind of host: the machine and a digest of its CPU's flags."""
  features = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      features = next((line for line in f if line.startswith(("flags", "Features"))), features)
  except OSError:
    pass
  digest = hashlib.sha256(" ".join(sorted(features.split())).encode()).hexdigest()[:12]
  return f"{platform.machine() or 'unknown'}-{digest}"


def enable(directory: str | None = None) -> str | None:
  """Turns the persistent cache on in `directory` (default: default_directory()), in its host
  subfolder, before the process's first compilation. Returns the folder used, or None when
  turned off (`none`, or a default folder that cannot be made: a warning says so). JAX's own
  JAX_COMPILATION_CACHE_DIR, when set, is left in charge."""
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  given = directory is not None
  directory = directory if given else default_directory()
  if directory.strip().lower() == DISABLED:
    return None
  path = os.path.join(os.path.abspath(os.path.expanduser(directory)), host_kind())
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    reason = f"cannot make the compilation cache folder {path} ({e.strerror})"
    if given:
      raise UserError(f"--compilation_cache={directory}: {reason}; give a writable folder, or "
                      "'none' to compile afresh every run") from e
    log.warning("%s; compiling without it (set --compilation_cache or $%s)", reason,
                ENVIRONMENT_VARIABLE)
    return None
  if not reloads_here(path):
    log.warning("XLA:CPU on this host does not read back the programs it caches "
                "(jax-ml/jax#38445); compiling without the cache (%s)", path)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path


def _versions() -> str:
  import jax, jaxlib  # pylint: disable=import-outside-toplevel,multiple-imports
  return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}"


def reloads_here(path: str) -> bool:
  """Whether XLA:CPU on this host reads back a program cached in `path`: asked once per jax
  version in a subprocess (this process's backends must stay uninitialised until
  jax.distributed is set up), the answer kept in `path`/RELOAD_CHECK."""
  record_path, versions = os.path.join(path, RELOAD_CHECK), _versions()
  try:
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    if record["versions"] == versions:
      return bool(record["reloads"])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  try:
    result = subprocess.run([sys.executable, "-m", __name__, path], capture_output=True,
                            text=True, timeout=300, env={**environment, "JAX_PLATFORMS": "cpu"})
  except (OSError, subprocess.TimeoutExpired):
    return False  # No answer this time (not kept): asked again by the next run.
  if result.returncode != 0:
    return False
  reloads = result.stdout.split()[-1:] == ["reloads"]
  temporary = f"{record_path}.{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump({"versions": versions, "reloads": reloads}, f)
  os.replace(temporary, record_path)
  return reloads


def _check_reload(path: str) -> str:
  """In a fresh process: compile a small program into `path`, forget it in memory, compile it
  again, and say whether the second compilation was read from the cache."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  # Bounded like every other user of the folder: the bound's eviction expects each entry's
  # access-time file, which only a bounded cache writes.
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  hits = []
  jax.monitoring.register_event_listener(
      lambda name, **_: hits.append(name) if name.endswith("/cache_hits") else None)
  for _ in range(2):
    jax.jit(_reload_probe).lower(jnp.zeros((8, 8), jnp.float32)).compile()
    jax.clear_caches()
  return "reloads" if hits else "does not reload"


def _reload_probe(x):
  return (x @ x.T).sum()


def add_argument(parser) -> None:
  parser.add_argument(
      "--compilation_cache", default=None, metavar="DIR",
      help="where compiled XLA programs are kept for the next run (default "
           f"${ENVIRONMENT_VARIABLE}, else ~/.cache/jaxlm/xla); 'none' turns it off")


if __name__ == "__main__":
  print(_check_reload(sys.argv[1]))
