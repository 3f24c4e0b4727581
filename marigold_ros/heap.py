"""
Keep large message buffers in the heap (glibc), so big images and clouds are cheap to copy.

glibc's malloc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at start, adapting up to
32 MiB only after such a block is freed) with a fresh ``mmap``, and gives freed heap memory
back to the system above ``M_TRIM_THRESHOLD``. Either way every multi-megabyte image, depth
map or cloud buffer lands on new pages and pays a page fault per 4 KiB. Raising both once at
start-up avoids that; the price is that freed memory stays in the process (resident size
settles at the working set's peak).
"""

import ctypes
import ctypes.util

#: mallopt parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's own dynamic limit on 64-bit).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Freed memory kept before the heap is trimmed.
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers_in_heap():
    """Raise glibc's mmap and trim thresholds; return True when both were applied (glibc only)."""
    name = ctypes.util.find_library('c')
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
