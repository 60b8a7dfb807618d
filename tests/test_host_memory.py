"""glibc malloc tuning (jaxlm/host_memory.py): freed memory is reused, not faulted in again."""

import platform
import subprocess
import sys

import pytest

from jaxlm import host_memory
from jaxlm.train import parse_args

# Allocate, touch, free, then allocate and touch the same size again: the page faults of the
# second round show whether the first round's memory came back from the kernel or the process.
REUSE_SCRIPT = """
import ctypes, resource, sys
from jaxlm import host_memory
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


def test_not_applied_when_another_allocator_is_preloaded(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
  assert host_memory.keep_freed_memory() is False


def test_not_applied_without_glibc(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc", lambda: None)
  assert host_memory.keep_freed_memory() is False


def test_cli_flag():
  assert parse_args(["--gin_file=x.gin"]).host_malloc == "keep"
  assert parse_args(["--gin_file=x.gin", "--host_malloc=system"]).host_malloc == "system"
  with pytest.raises(SystemExit) as exit_info:
    parse_args(["--gin_file=x.gin", "--host_malloc=tcmalloc"])
  assert exit_info.value.code == 2
