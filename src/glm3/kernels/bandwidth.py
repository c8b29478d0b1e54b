"""The memory-read bandwidth of this host as a decode kernel sees it (csrc/bandwidth.cc): all cores streaming a
large buffer with wide loads, best of several runs. The limit a decoding speed is compared against: numpy sums
and a BLAS matrix-vector product read 20-40% slower on the same host and would flatter the kernels."""

from __future__ import annotations

import ctypes
import time

import numpy as np

from glm3.kernels.library import kernel_library


def stream_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float | None:
    """Bytes per second of reading `nbytes` (default 1 GiB, beyond any cache), best of `repeats`; None without
    the CPU kernels."""
    library = kernel_library()
    if library is None:
        return None
    read = ctypes.CDLL(library).glm3_stream_read
    read.restype, read.argtypes = ctypes.c_float, [ctypes.c_void_p, ctypes.c_int64]
    data = np.ones(nbytes // 4, np.float32)  # written once: every page is mapped before the timing
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        total = read(data.ctypes.data, data.size)
        best = max(best, data.nbytes / (time.perf_counter() - start))
    if abs(total - data.size) > 1e-5 * data.size:  # the sum of ones: proof that every float was read
        raise RuntimeError(f"the streaming-read kernel summed {total}, expected {data.size}")
    return best
