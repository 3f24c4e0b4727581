"""Tests of marigold_ros.heap (glibc malloc thresholds for large message buffers)."""

import ctypes
import ctypes.util
import platform

from marigold_ros import heap
import pytest


def _is_glibc():
    return platform.libc_ver()[0] == 'glibc'


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


@pytest.mark.skipif(not _is_glibc(), reason='mallopt and mallinfo2 are glibc functions: runs '
                    'on Linux with glibc (CI and the development machines)')
def test_large_blocks_come_from_the_heap_after_tuning():
    """After the call a 4 MB block is not a fresh mmap (hblks, the mmapped count, stays)."""
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    if not hasattr(libc, 'mallinfo2'):
        pytest.skip('this glibc is older than 2.33, which has no mallinfo2 to count mmapped '
                    'blocks: runs with glibc 2.33 or newer')
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    assert heap.keep_large_buffers_in_heap() is True
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 * 1024 * 1024)
    try:
        assert block and libc.mallinfo2().hblks == before
    finally:
        libc.free(block)


def test_without_a_c_library_nothing_happens(monkeypatch):
    """Where no C library is found the call is a no-op returning False."""
    monkeypatch.setattr(ctypes.util, 'find_library', lambda name: None)
    assert heap.keep_large_buffers_in_heap() is False
