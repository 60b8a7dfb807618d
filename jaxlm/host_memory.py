"""Host malloc settings for training on CPU: keep freed memory in the process for reuse.

XLA:CPU allocates a step's temporaries afresh on every step and frees them at its end. glibc
malloc serves large requests with mmap and gives them back to the kernel on free (and trims the
top of its heap), so every step page-faults and zero-fills its gigabytes of temporaries again:
on a bench-small step about 6 GB, 1.6 M minor faults and seconds of system time. jemalloc with
decay disabled avoids it, but needs LD_PRELOAD before the process starts; glibc's `mallopt` does
the same from inside the running process:

  M_MMAP_MAX = 0          large blocks come from the heap, not from mmap
  M_TRIM_THRESHOLD = max  the heap is never trimmed back to the kernel
  M_ARENA_MAX = 1         one heap for all threads: other threads' arenas are capped at 64 MiB
                          and fall back to mmap for anything larger

The price is that resident memory stays at the run's high-water mark, as it does under jemalloc
or TCMalloc (what MaxText's images preload). `python -m jaxlm.train` applies this unless
started with `--host_malloc=system`. On GPU and TPU hosts it touches only host-side allocations
(not measured there).
"""

import ctypes
import ctypes.util
import logging
import os

# mallopt(option, value) from glibc's malloc.h. A trim threshold of -1 turns trimming off.
SETTINGS = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, -1), "M_ARENA_MAX": (-8, 1)}
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

log = logging.getLogger(__name__)


def _glibc():
  """The process's C library if it is glibc (mallopt with these options is glibc's), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Make glibc malloc keep freed memory for reuse (see module doc). Returns whether it applied:
  False on a C library other than glibc (macOS, musl) or when another allocator (jemalloc,
  TCMalloc via LD_PRELOAD) already owns malloc — both keep nothing to tune here."""
  libc = _glibc()
  if libc is None or not hasattr(libc, "mallopt"):
    return False
  if any(name in os.environ.get("LD_PRELOAD", "") for name in PRELOADED_ALLOCATORS):
    return False
  applied = all([libc.mallopt(option, value) == 1 for option, value in SETTINGS.values()])
  if not applied:
    log.warning("glibc mallopt refused %s; host memory is handed back after every step",
                sorted(SETTINGS))
  return applied

