"""Freed CPU memory kept by a long-running process, for its next step to reuse.

Every training step on a CPU allocates and frees the same large tensors (logits, the
[vocab, hidden] gradients). glibc serves each block over 32 MB with an mmap of its own
and unmaps it when freed, so the next step faults it in again page by page: ~380k page
faults (1.5 GB) an update step of SmolLM2-135M, 5% of its time alone and more when the
`--async` sampler faults at the same moment (bench/bench_heap.py). With large blocks
served from the heap and the heap never trimmed, a step reuses what the one before it
freed, as torch's CUDA caching allocator does on a GPU. `loop` and its sampler process
set this; one-shot commands and library callers keep glibc's defaults.

A heap can fragment instead of being reused (torch asks for aligned blocks, which a
freed block of the same size does not always fit), so the processes call
`release_if_grown` once a step: past 1.5 times the resident size after the first step
(+512 MB), the free memory goes back to the system, as with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


_kept = False
_reference: int | None = None  # resident bytes at the first release_if_grown


def keep_freed_memory() -> bool:
    """glibc's mallopt: no mmap for large blocks, no trimming of the heap. True where it
    took effect (Linux with glibc), False elsewhere: nothing changes."""
    global _kept
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            _kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
        except (OSError, AttributeError):  # no glibc
            pass
    return _kept


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_if_grown() -> bool:
    """After a step: if the heap is kept and the process has grown past 1.5 times its size
    after the first step, plus 512 MB, give its free memory back (malloc_trim). True if
    released."""
    global _reference
    if not _kept:
        return False
    size = resident_bytes()
    if _reference is None:
        _reference = size
    if size <= 1.5 * _reference + 2**29:
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True
