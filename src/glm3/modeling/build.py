"""How a model is built, beside what it is (its GLM3Config): BuildOptions, and the helpers every layer's
constructor shares (lazy parameters, weights in the compute dtype)."""

from __future__ import annotations

import dataclasses

import mindspore as ms
from mindspore import Parameter, ops
from mindspore.common.initializer import Normal, Zero, initializer

from glm3 import kernels
from glm3.dtypes import name_of as dtype_name
from glm3.dtypes import to_mindspore as to_ms_dtype
from glm3.quantization import QuantizationConfig

__all__ = ["BuildOptions", "as_compute", "dtype_name", "new_param", "to_ms_dtype"]


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a model is built: every cell's constructor takes (config, options), or its sizes and options for the
    generic Linear, RMSNorm and Embedding.

    dtype: parameter storage; compute_dtype: matmul precision (float32 on CPU); backend: a resolved kernel
    backend ("plain", "cpu" or "ascend", see glm3.kernels); init: "normal" (a fresh model) or "lazy" (nothing
    allocated: load_model fills the weights next); kernel_rows: with the "cpu" backend, products of up to this
    many rows with a float32 weight go through our kernels (above it MindSpore's MatMul is faster); quantization:
    the model's weight-only quantization (config.quantization), if any. Our kernels
    give every row the same result whatever the number of rows, MindSpore's MatMul does not, so the serving
    engine raises this to its widest decode batch (glm3.runtime.engine)."""

    dtype: ms.Type = ms.float32
    compute_dtype: ms.Type = ms.float32
    backend: str = "plain"
    init: str = "normal"
    kernel_rows: int = kernels.SMALL_M
    quantization: QuantizationConfig | None = None  # weight-only quantized linear weights (glm3.quantization)

    def initializer(self):
        return Normal(0.02) if self.init == "normal" else Zero()

    def cpu_library(self) -> str | None:
        """The library of our CPU kernels when this build runs them (the "cpu" backend computing in float32,
        and the library built), else None: the one test every layer makes."""
        if self.backend != "cpu" or self.compute_dtype != ms.float32:
            return None
        return kernels.kernel_library()


def new_param(shape, dtype, init, name):
    """An initializer-backed Parameter: it allocates nothing until it is used or init_data() is called;
    load_model replaces the data of every one, so a big model is never randomly initialised first."""
    return Parameter(initializer(init, shape, dtype), name=name)


def as_compute(weight, x, dtype):
    """`weight` in the compute dtype for an op on `x`.

    A half-precision weight is cast inside the graph, tied to `x` by a depend edge. Without it MindSpore
    treats Cast(Parameter) as a constant of the graph and keeps every cast result alive between calls: a
    float32 copy of every half-precision weight (measured: 0.81 GB more for 0.40 GB of float16 weights; at
    6B it is the difference between 12.5 GB and an OOM kill). Tied to the input, each cast is computed when
    needed and its buffer is reused by the next one.
    """
    if weight.dtype == dtype:
        return weight
    return ops.depend(weight, x).astype(dtype)
