"""Host memory on CPU: keep freed memory for the next step, and run one step at a time so that
what is kept stays bounded by one step's worth.

XLA:CPU allocates a step's temporaries afresh on every step and frees them at its end. glibc
malloc serves large requests with mmap and gives them back to the kernel on free (and trims the
top of its heap), so every step page-faults and zero-fills its gigabytes of temporaries again:
on a bench-small step about 6 GB, 1.6 M minor faults and seconds of system time. glibc's
`mallopt` keeps them instead, from inside the running process:

  M_MMAP_MAX = 0          large blocks come from the heap, not from mmap
  M_TRIM_THRESHOLD = max  the heap is never trimmed back to the kernel
  M_ARENA_MAX = 1         one heap for all threads: other threads' arenas are capped at 64 MiB
                          and fall back to mmap for anything larger

That alone let resident memory grow far past XLA's plan (bench-small float32: plan 3,663 MiB,
peak RSS 9,904-12,909 MiB, 15.9 GB seen), in steps of one temporaries block. XLA:CPU puts most
of a step's temporaries in one malloc (2,994 MiB on bench-small), freed by the thread that ran
the step just *after* the step's outputs are ready. With JAX's asynchronous CPU dispatch the
next step, queued on those outputs, starts on another thread and often allocates its own block
before the last one is freed (a malloc trace saw it in 2 of the first 3 steps, then once more
by step 15). Two blocks are then live and the heap grows by one; and because glibc serves small
requests from free chunks before the top of the heap, the freed block's hole is soon split and
never fits a whole block again, so the next overlap grows the heap once more. Nothing is
trimmed, so every growth stays resident.

So keep_freed_memory() also turns asynchronous dispatch off on the CPU backend
(`jax_cpu_enable_async_dispatch`): a step runs inline in the calling thread and frees its
temporaries before the call returns, the next step reuses the same block at the same address,
and resident memory stays at one step's worth: 3,977-3,988 MiB on bench-small (1.09x the
plan, against 2.7x before), flat over 40 steps, at the same step time within noise (-3% to
+5% over three alternating pairs of tools/bench.py `--allocator=keep` and `keep-async` runs,
CPU seconds per step equal within 1%; table in README.md, Performance). What it costs is that
Python no longer runs ahead of the CPU while a step runs (the trainer reads the next batch
after a step, not during it: milliseconds against seconds here). It covers single-device
CPU computations only (JAX runs multi-device CPU computations asynchronously regardless), so a
run on a multi-device CPU mesh can still overlap steps and grow.

Not chosen on one run: M_MMAP_THRESHOLD = 1 GiB instead of M_MMAP_MAX = 0, with dispatch
left asynchronous (only the big block is mmapped, and returned each step), bounded bench-small
just as well (3,978 MiB) but faulted the block in again every step, ~2% more CPU time per step
(same wall time); it would also cover multi-device CPU meshes. `--host_malloc=system` is the
slow end of that trade.
jemalloc with decay off (LD_PRELOAD before start; then malloc is not ours to tune and nothing
here is applied) keeps the overlap. `python -m jaxlm.train` applies this unless started with
`--host_malloc=system`. On GPU and TPU hosts it touches only host-side allocations and JAX's
host CPU backend.
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


def run_steps_one_at_a_time() -> None:
  """Make the CPU backend run each computation inline, so a step's temporaries are freed before
  the next step allocates its own (see module doc). Must run before JAX's first computation."""
  import jax  # pylint: disable=import-outside-toplevel
  try:  # A private probe, only for the warning: the setting is read when the CPU client is made.
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    log.warning("JAX's backends are already up; CPU steps keep overlapping and host memory "
                "can grow past one step's worth")
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_memory(one_step_at_a_time: bool = True) -> bool:
  """Make glibc malloc keep freed memory for reuse and, unless told otherwise, run CPU steps one
  at a time so what is kept stays at one step's worth (see module doc). Returns whether it
  applied: False on a C library other than glibc (macOS, musl) or when another allocator
  (jemalloc, TCMalloc via LD_PRELOAD) already owns malloc; then nothing is changed."""
  libc = _glibc()
  if libc is None or not hasattr(libc, "mallopt"):
    return False
  if any(name in os.environ.get("LD_PRELOAD", "") for name in PRELOADED_ALLOCATORS):
    return False
  applied = all([libc.mallopt(option, value) == 1 for option, value in SETTINGS.values()])
  if not applied:
    log.warning("glibc mallopt refused %s; host memory is handed back after every step",
                sorted(SETTINGS))
    return False
  if one_step_at_a_time:
    run_steps_one_at_a_time()
  return True
