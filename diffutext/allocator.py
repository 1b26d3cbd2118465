"""CPU training memory: keep glibc from hoarding the blocks a training step frees.

glibc serves an allocation below its mmap threshold from the heap, and raises that threshold (up to
32 MB) each time a larger block is freed. A training step frees and reallocates hundreds of
activation-sized blocks; in the heap they fragment, and resident memory grows far past what the
tensors need: at the base preset, batch 64 × 128 tokens, 8.8 GB resident over a few steps for about
5.6 GB of live tensors. `limit_heap_fragmentation` fixes the threshold at 16 MB, so every block of
16 MB or more comes from mmap and goes back to the system when freed (benchmarks/speed.py measures
the result). Smaller models never allocate blocks that large and are unaffected.

A threshold the user set through glibc's own MALLOC_MMAP_THRESHOLD_ is left alone; on other C
libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 16 << 20


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold at 16 MB for this process; True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
