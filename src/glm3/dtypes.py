"""The project's one vocabulary of dtypes: their names, sizes and MindSpore types.

Weights are stored as float32, float16 or bfloat16 (FLOAT_DTYPES), quantized weights as int8 or packed-int4
uint8 (QUANTIZED_DTYPES). Every flag, setting and file format names them by these strings; "auto" (a flag's
default) means the checkpoint's own. MindSpore's types are looked up on use, so importing this module stays
cheap (the CLI builds its parser from it).
"""

from __future__ import annotations

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANTIZED_DTYPES = ("int8", "uint8")
DTYPE_CHOICES = ("auto", *FLOAT_DTYPES)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
# A half-precision or quantized weight multiplied by MindSpore's MatMul (no CPU kernels, as in exported graphs)
# is converted to float32 in blocks of rows of this many bytes (glm3.modeling.linear); MindSpore splits the
# weight into its stored blocks first, so the largest weight is copied once in its own dtype besides two blocks.
CAST_BLOCK_BYTES = 64 << 20


def check_float_dtype(dtype: str, what: str = "dtype") -> str:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    return dtype


def to_mindspore(dtype):
    """The MindSpore type of a dtype name (a MindSpore float type is returned as it is)."""
    import mindspore as ms

    types = {name: getattr(ms, name) for name in FLOAT_DTYPES + QUANTIZED_DTYPES}
    if isinstance(dtype, str):
        if dtype not in types:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
        return types[dtype]
    if dtype in types.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}")


def name_of(dtype) -> str:
    """ "float32", "float16", ... of a MindSpore type."""
    import mindspore as ms

    return next(name for name in FLOAT_DTYPES + QUANTIZED_DTYPES if getattr(ms, name) == dtype)
