"""load_model / save_model: model directories in our MindSpore layout or in HuggingFace layout."""

from __future__ import annotations

import os
from collections.abc import Iterator

import mindspore as ms
import numpy as np
from mindspore import Tensor

from glm3.dtypes import name_of as dtype_name
from glm3.dtypes import to_mindspore as to_ms_dtype
from glm3.io import atomic_directory
from glm3.kernels import resolve_backend
from glm3.memory import check_memory, inference_estimate
from glm3.modeling.config import GLM3Config, resolve_dtype
from glm3.modeling.model import GLM3ForCausalLM
from glm3.modeling.tokenizer import VOCAB_FILE, ChatGLM3Tokenizer, copy_tokenizer_files
from glm3.quantization import SCALE_SUFFIX
from glm3.weights.checkpoint import CheckpointError, iter_checkpoint
from glm3.weights.shards import DEFAULT_SHARD_SIZE, write_model_weights

_NUMPY = {ms.float32: np.float32, ms.float16: np.float16}


def as_param_data(array: np.ndarray, dtype) -> Tensor:
    """A Tensor of the parameter dtype; no copy when the array already has it. A quantized model's integer data
    and float16 scales (checked by iter_checkpoint) keep their own dtype."""
    if array.dtype.kind in "iu":
        return Tensor.from_numpy(np.ascontiguousarray(array))
    if dtype in _NUMPY:
        return Tensor.from_numpy(np.ascontiguousarray(array.astype(_NUMPY[dtype], copy=False)))
    return Tensor(np.ascontiguousarray(array.astype(np.float32, copy=False))).astype(dtype)


def setup_mindspore(mode: str = "graph") -> None:
    """Device from GLM3_DEVICE ("CPU" unless set, e.g. "Ascend") and graph or PyNative mode."""
    ms.set_device(os.environ.get("GLM3_DEVICE", "CPU"))
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)


def load_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    compute_dtype: str = "float32",
    kernels_backend: str = "auto",
    kernel_rows: int | None = None,
) -> GLM3ForCausalLM:
    """Load a ChatGLM3 model directory: config.json plus weights in any supported layout.

    dtype: parameter storage, "auto" (the checkpoint's own, config.json torch_dtype), float32, float16 or
    bfloat16; compute_dtype: the precision of the matmuls (float32 on CPU: half-precision weights are
    converted per layer, on the fly); kernel_rows: see glm3.modeling.build.BuildOptions.

    Layouts: ours (mindspore_model.ckpt, or shards + mindspore_model.ckpt.index.json), MindFormers' single
    .ckpt, HuggingFace safetensors (sharded with index, or not) and pytorch_model*.bin (read with
    weights_only=True). Every tensor is checked against the config (name, shape); the model's parameters
    are created without data and filled tensor by tensor, so memory stays at one copy of the weights.
    If a tokenizer.model sits beside the weights, its <|user|>/<|observation|> ids become stop tokens.
    """
    path = os.fspath(path)
    config = GLM3Config.from_hf(path)
    dtype = resolve_dtype(dtype, config)
    kernels_backend = resolve_backend(kernels_backend)
    described = f"{dtype}, {config.quantization.bits}-bit weights" if config.quantization else dtype
    check_memory(
        inference_estimate(config, dtype, kernels=kernels_backend == "cpu", what=f"loading {path} as {described}")
    )
    model = GLM3ForCausalLM(
        config,
        dtype=dtype,
        compute_dtype=compute_dtype,
        kernels_backend=kernels_backend,
        param_init="lazy",
        kernel_rows=kernel_rows,
    )
    params = {p.name: p for p in model.get_parameters()}
    target = to_ms_dtype(dtype)
    scales = {n for n in params if n.endswith(SCALE_SUFFIX)}  # a quantized model's scales: float16 as stored
    for name, array, _ in iter_checkpoint(path, config, skip_training_state=True):
        params[name].set_data(as_param_data(array, params[name].dtype if name in scales else target))
    if os.path.isfile(os.path.join(path, VOCAB_FILE)):
        tokenizer = ChatGLM3Tokenizer.from_pretrained(path)
        model.stop_token_ids = tokenizer.stop_token_ids[1:]
    model.set_train(False)
    return model


def parameter_array(param) -> np.ndarray:
    """A parameter's value as a numpy array: float32/float16/int8/uint8 as stored, bfloat16 as float32 (exact)."""
    if param.dtype == ms.bfloat16:
        return param.value().astype(ms.float32).asnumpy()
    return param.asnumpy()


def model_tensors(model: GLM3ForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of the model's weights, one at a time (LoRA adapters and dropout masks excluded)."""
    for param in model.get_parameters():
        if not param.name.endswith((".lora_a", ".lora_b", ".lora_mask")):
            yield param.name, parameter_array(param)


def save_model(
    model: GLM3ForCausalLM,
    directory: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> str:
    """Write a model directory in our MindSpore layout: config.json, the weights as `dtype` ("auto": the
    model's storage dtype) in shards of `shard_size` with an index (one mindspore_model.ckpt when they fit),
    and the tokenizer files of `tokenizer_dir`.

    Tensor by tensor, so memory stays at one tensor; the directory appears complete or not at all.
    """
    directory = os.fspath(directory)
    stored = dtype_name(model.dtype)
    dtype = stored if dtype == "auto" else dtype
    config = model.config.replace(torch_dtype=dtype)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_model_weights(model_tensors(model), tmp, config, dtype, shard_size, where=directory)
        config.save(tmp)
        if tokenizer_dir is not None:
            if not copy_tokenizer_files(tokenizer_dir, tmp):
                raise CheckpointError(f"no tokenizer files in {tokenizer_dir}")
    return directory
