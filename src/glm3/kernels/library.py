"""The library of our CPU kernels (csrc/*.cc: the linear layers' products, the paged cache's write and
attention), compiled on first use into a per-user cache (glm3.native: GLM3_KERNEL_CACHE, default
~/.cache/glm3/kernels). GLM3_DISABLE_CPU_KERNEL=1, or no working compiler: None, and the model runs MindSpore's
own operators."""

from __future__ import annotations

import os

from glm3.native import CSRC, HEADERS, KERNEL_SOURCES, build_library

SOURCES = tuple(os.path.join(CSRC, name) for name in KERNEL_SOURCES)


def kernel_library() -> str | None:
    """Path of the compiled kernel library, building it if needed; None if it cannot be built."""
    if os.environ.get("GLM3_DISABLE_CPU_KERNEL") == "1":
        return None
    return build_library(
        SOURCES,
        "the model runs MindSpore's own operators (slower; float32 copies of half-precision weights)",
        name="cpu_kernels",
        headers=HEADERS,
    )
