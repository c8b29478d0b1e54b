"""The project's small C++ sources (CPU kernels, a signal helper), compiled on first use with the host's
compiler into a per-user cache: GLM3_KERNEL_CACHE, default ~/.cache/glm3/kernels, keyed by the source, the
flags, the compiler and the machine. Without a working compiler `build_library` returns None, says why in the
log, and the callers fall back (MindSpore's MatMul; a plainer stop report).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")  # the package's one C++ tree
# The sources of each library built from it (headers: csrc/*.h, shared by the kernels).
KERNEL_SOURCES = (
    "linear.cc",
    "quantized.cc",
    "paged_attention.cc",
    "elementwise.cc",
    "decode_layer.cc",
    "bandwidth.cc",
)
HEADERS = ("float_types.h", "layer_ops.h", "pool.h", "simd.h")
SIGTERM_SENDER = "sigterm_sender.cc"

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")


def cache_dir() -> str:
    return os.environ.get("GLM3_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "glm3", "kernels"))


def _machine() -> bytes:
    """The machine and its instruction-set extensions: -march=native code built on one host may not run on
    another (a cache directory shared between hosts, or a VM moved to an older CPU)."""
    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        pass
    return os.uname().machine.encode() + b" " + flags


@functools.cache
def build_library(
    sources: str | tuple[str, ...], without: str, name: str | None = None, headers: tuple[str, ...] = ()
) -> str | None:
    """Path of the shared library compiled from `sources` (.cc files, and the `headers` they include: csrc names),
    building it once; None if it cannot be built. `without` completes the warning "... : <without>", saying
    what the caller does instead. `name`: the library's name (default: the first source's)."""
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler found: %s", without)
        return None
    code = b""
    for path in (*sources, *(os.path.join(CSRC, h) for h in headers)):
        with open(path, "rb") as f:
            code += f.read()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C++ compiler %s unusable (%s): %s", compiler, exc, without)
        return None
    key = hashlib.sha256(code + " ".join(FLAGS).encode() + version + _machine()).hexdigest()[:16]
    stem = name or os.path.splitext(os.path.basename(sources[0]))[0]
    target = os.path.join(cache_dir(), f"{stem}-{key}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        command = [compiler, *FLAGS, "-o", tmp, *sources]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            log.warning("building %s failed: %s\n%s", stem, without, result.stderr[-2000:])
            os.unlink(tmp)
            return None
        os.replace(tmp, target)  # atomic: concurrent builders (msrun workers) all end with a complete file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
