"""x W^T: MindSpore's MatMul, or for decoding on CPU our streaming kernel (csrc/linear_small_m.cc).

The kernel is compiled on first use into a per-user cache (GLM3_KERNEL_CACHE, default
~/.cache/glm3/kernels) keyed by the source, the flags and the compiler; without a working compiler the
model silently keeps MindSpore's MatMul (`small_m_kernel()` returns None and says why in the log).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

from mindspore import ops

log = logging.getLogger(__name__)

# Rows of x up to which the streaming kernel is used; above it MindSpore's MatMul is compute-efficient.
SMALL_M = 8
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "linear_small_m.cc")
_SYMBOL = "glm3_linear_small_m"
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread"]


def _cache_dir() -> str:
    return os.environ.get("GLM3_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "glm3", "kernels"))


@functools.lru_cache(maxsize=None)
def small_m_kernel() -> str | None:
    """Path of the compiled kernel library ("file.so"), building it if needed; None if it cannot be built."""
    if os.environ.get("GLM3_DISABLE_CPU_KERNEL") == "1":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler found: decoding uses MindSpore's MatMul (slower)")
        return None
    with open(_SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C++ compiler %s unusable (%s): decoding uses MindSpore's MatMul", compiler, exc)
        return None
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + version + os.uname().machine.encode()).hexdigest()[:16]
    target = os.path.join(_cache_dir(), f"linear_small_m-{key}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, "-o", tmp, _SOURCE], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            log.warning("building the CPU decode kernel failed, using MindSpore's MatMul:\n%s", result.stderr[-2000:])
            os.unlink(tmp)
            return None
        os.replace(tmp, target)  # atomic: concurrent builders (msrun workers) all end with a complete file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def small_m_op(library: str):
    """A MindSpore AOT custom op computing x [m, k] . w [n, k]^T -> [m, n] in float32."""
    return ops.Custom(f"{library}:{_SYMBOL}", out_shape=lambda x, w: (x[0], w[0]), out_dtype=lambda x, w: x,
                      func_type="aot")
