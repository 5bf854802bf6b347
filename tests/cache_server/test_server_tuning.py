"""How `slipstream serve` tunes its own process: malloc and the garbage collector."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_MMAPPED_CHUNKS = """
import ctypes, sys
from slipstream.cache_server.server import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
before = mallinfo2().hblks
buffer = bytearray(1 << 20)  # the size of a blob chunk
print(mallinfo2().hblks - before)
"""


@pytest.mark.parametrize(("mode", "mapped"), [("default", "1"), ("tuned", "0")])
def test_server_keeps_blob_chunks_off_fresh_mappings(mode: str, mapped: str) -> None:
    """With keep_freed_memory (the server calls it at start) a 1 MiB chunk comes from the
    heap, not from a fresh mapping of its own (glibc only: where CI runs)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"not glibc ({platform.libc_ver()[0] or 'unknown libc'}): nothing to tune")
    run = subprocess.run(
        [sys.executable, "-c", _MMAPPED_CHUNKS, mode], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == mapped


_COLLECTOR = """
import gc
from slipstream.cache_server.server import freeze_start_up_objects

thresholds = gc.get_threshold()
freeze_start_up_objects()
print(gc.get_freeze_count() > 0, gc.get_threshold() == thresholds)

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the collector can free it
del a, b
print(gc.collect() >= 2)
"""


def test_server_freezes_what_start_up_built_and_still_collects_cycles() -> None:
    """After freeze_start_up_objects (the server calls it once it is built) the objects
    that exist are out of every later collection, CPython's thresholds are untouched,
    and cycles made afterwards are still collected."""
    run = subprocess.run(
        [sys.executable, "-c", _COLLECTOR], capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == ["True", "True", "True"]
