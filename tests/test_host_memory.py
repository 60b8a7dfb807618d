"""Host memory on CPU (jaxlm/training/host_memory.py): freed memory is reused, not faulted in again, and
a step is done (its temporaries freed) before the next one can start."""

import platform
import subprocess
import sys

import pytest

from jaxlm.training import host_memory
from jaxlm.train import parse_args

# Allocate, touch, free, then allocate and touch the same size again: the page faults of the
# second round show whether the first round's memory came back from the kernel or the process.
REUSE_SCRIPT = """
import ctypes, resource, sys
from jaxlm.training import host_memory
if sys.argv[1] == "keep":
  assert host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def round_trip():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def _second_round_faults(mode: str) -> int:
  done = subprocess.run([sys.executable, "-c", REUSE_SCRIPT, mode], capture_output=True,
                        text=True, check=True)
  return int(done.stdout.split()[-1])


@needs_glibc
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  pages = (256 << 20) // 4096
  # glibc's defaults mmap a 256 MiB block and unmap it on free: every page faults again
  # (fewer only if the kernel backs some of it with huge pages).
  assert _second_round_faults("system") > pages // 8
  # Kept: the second block is the first one's memory, already resident. A few hundred faults
  # of slack for the interpreter's own allocations.
  assert _second_round_faults("keep") < 500


# A jitted computation of a few hundred ms on the CPU: with asynchronous dispatch the call
# returns at once and the result is not ready yet; one at a time, it returns once it is.
DISPATCH_SCRIPT = """
import sys
from jaxlm.training import host_memory
assert host_memory.keep_freed_memory(one_step_at_a_time=sys.argv[1] == "keep")
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jax.lax.fori_loop(0, 32, lambda _, y: jnp.tanh(y @ y), x))
x = jnp.full((1024, 1024), 1e-3, jnp.float32)
step(x).block_until_ready()  # Compiled and warm.
y = step(x)
print(y.is_ready(), jax.config.read("jax_cpu_enable_async_dispatch"))
"""


@needs_glibc
def test_a_step_is_done_before_the_call_returns():
  # Why (module doc): with asynchronous dispatch the next step can allocate its temporaries
  # before the last step has freed its own, and the kept heap grows by a step's worth each time.
  def ready_and_async(mode):
    done = subprocess.run([sys.executable, "-c", DISPATCH_SCRIPT, mode], capture_output=True,
                          text=True, check=True, timeout=120)
    return done.stdout.split()
  assert ready_and_async("keep") == ["True", "False"]
  assert ready_and_async("keep-async") == ["False", "True"]


def test_not_applied_when_another_allocator_is_preloaded(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
  called = []
  monkeypatch.setattr(host_memory, "run_steps_one_at_a_time", lambda: called.append(1))
  assert host_memory.keep_freed_memory() is False
  assert not called


def test_not_applied_without_glibc(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc", lambda: None)
  called = []
  monkeypatch.setattr(host_memory, "run_steps_one_at_a_time", lambda: called.append(1))
  assert host_memory.keep_freed_memory() is False
  assert not called  # Nothing is changed where malloc is not ours to tune.


def test_cli_flag():
  assert parse_args(["--gin_file=x.gin"]).host_malloc == "keep"
  assert parse_args(["--gin_file=x.gin", "--host_malloc=system"]).host_malloc == "system"
  with pytest.raises(SystemExit) as exit_info:
    parse_args(["--gin_file=x.gin", "--host_malloc=tcmalloc"])
  assert exit_info.value.code == 2
