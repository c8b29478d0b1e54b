"""`glm3 quantize`: a model directory (any layout glm3 reads) -> a weight-only quantized model in our layout.

Streaming: one tensor is read, quantized (glm3.quantization) and written at a time, so memory stays at the
largest tensor and its float32 working copy (1 GB for the 6B output layer), whatever the model's size. The
destination is built beside itself and renamed into place when complete. Weights that stay in floating point
(norms, biases, the embedding unless asked) keep the source's dtype, or `dtype`.
"""

from __future__ import annotations

import dataclasses
import os
import time

from glm3.io import atomic_directory, byte_progress, check_destination
from glm3.modeling.config import GLM3Config, resolve_dtype
from glm3.modeling.tokenizer import copy_tokenizer_files
from glm3.quantization import QuantizationConfig, quantize, scale_name
from glm3.weights.checkpoint import expected_dtypes, expected_shapes, iter_checkpoint
from glm3.weights.shards import DEFAULT_SHARD_SIZE, write_model_weights
from glm3.weights.tensor_files import storage_nbytes


@dataclasses.dataclass
class QuantizeSummary:
    src: str
    dst: str
    bits: int
    group_size: int
    quantized: int  # tensors quantized
    source_bytes: int  # the float model's weights in its dtype
    bytes: int  # the quantized model's weights
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (
            f"quantized {self.quantized} weights to {self.bits} bits (groups of {self.group_size}): "
            f"{self.source_bytes / 1e9:.3f} GB -> {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s: {self.dst}"
        )


def quantize_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    bits: int,
    group_size: int = 32,
    *,
    output_layer: bool = True,
    embedding: bool = False,
    dtype: str = "auto",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeSummary:
    """Quantize the model directory `src` into `dst` (see the module docstring)."""
    src, dst = os.fspath(src), os.fspath(dst)
    source = GLM3Config.from_hf(src)
    if source.quantization is not None:
        raise ValueError(f"{src} is already quantized ({source.quantization.bits} bits); quantize its float source")
    settings = QuantizationConfig(bits, group_size, output_layer=output_layer, embedding=embedding)
    dtype = resolve_dtype(dtype, source)
    config = source.replace(torch_dtype=dtype, quantization=settings)
    shapes, exact = expected_shapes(config), expected_dtypes(config)  # checks every quantized shape first
    total = sum(storage_nbytes(shape, exact.get(name, dtype)) for name, shape in shapes.items())
    source_bytes = sum(storage_nbytes(shape, source.torch_dtype) for shape in expected_shapes(source).values())
    check_destination(dst, total, overwrite, src=src)
    start = time.perf_counter()

    def tensors(bar):
        for name, array, _ in iter_checkpoint(src, source, skip_training_state=True):
            if settings.covers(name):
                data, scales = quantize(array, settings)
                del array
                bar.update(data.nbytes + scales.nbytes)
                yield name, data
                yield scale_name(name), scales
            else:
                bar.update(storage_nbytes(array.shape, dtype))
                yield name, array

    with atomic_directory(dst, overwrite=overwrite) as tmp:
        with byte_progress(total, f"quantize to {bits} bits", progress, mininterval=0.5) as bar:
            write_model_weights(tensors(bar), tmp, config, dtype, shard_size, where=src)
        config.save(tmp)
        copy_tokenizer_files(src, tmp)
    return QuantizeSummary(
        src, dst, bits, group_size, len(exact) // 2, source_bytes, total, time.perf_counter() - start
    )
