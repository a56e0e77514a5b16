"""glibc heap settings for CPU inference.

Every denoiser evaluation allocates and frees activations of 10-35 MB. With glibc's defaults those
come from mmap (or the trimmed heap top) and go back to the kernel on free, so the next evaluation
page-faults the same memory in again, zero-filled: about 1.8 million minor faults per 6 slices,
about a third of the main thread's inference time on 2 cores (docs/benchmarks.md). Keeping freed memory in the process
during a job removes that; `trim` hands it back when the job is done, so the idle daemon stays
small. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("dicomnode.infer")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; larger blocks still come from mmap
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse (until `trim`); True when the settings took."""
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.warning("glibc refused the heap settings for inference; CPU inference may be slower")
    return ok


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas. The node process runs a thread per association; by
    default each may get an arena of its own that keeps freed memory, so RSS ratchets up under
    many short connections (fuzzing took it from 78 to 455 MB). Call before threads start."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, count) == 1


def trim() -> None:
    """Return the free memory kept during a job to the kernel."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
