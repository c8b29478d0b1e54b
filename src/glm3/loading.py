"""load_model / save_model: model directories in our MindSpore layout or in HuggingFace layout."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
from mindspore import Tensor

from glm3.checkpoint import MS_CKPT, CheckpointError, iter_checkpoint
from glm3.config import GLM3Config
from glm3.io import atomic_directory
from glm3.model import GLM3ForCausalLM, to_ms_dtype
from glm3.tokenizer import VOCAB_FILE, ChatGLM3Tokenizer, copy_tokenizer_files

_NUMPY = {ms.float32: np.float32, ms.float16: np.float16}


def _as_param_data(array: np.ndarray, dtype) -> Tensor:
    """A Tensor of the parameter dtype; no copy when the array already has it."""
    if dtype in _NUMPY:
        return Tensor.from_numpy(np.ascontiguousarray(array.astype(_NUMPY[dtype], copy=False)))
    return Tensor(np.ascontiguousarray(array.astype(np.float32, copy=False))).astype(dtype)


def setup_mindspore(mode: str = "graph") -> None:
    """Device from GLM3_DEVICE ("CPU" unless set, e.g. "Ascend") and graph or PyNative mode."""
    ms.set_device(os.environ.get("GLM3_DEVICE", "CPU"))
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)


def load_model(path: str | os.PathLike, dtype: str = "float32", compute_dtype: str = "float32",
               kernels_backend: str = "auto") -> GLM3ForCausalLM:
    """Load a ChatGLM3 model directory: config.json plus weights in any supported layout.

    Layouts: ours (mindspore_model.ckpt, or shards + mindspore_model.ckpt.index.json), MindFormers' single
    .ckpt, HuggingFace safetensors (sharded with index, or not) and pytorch_model*.bin (read with
    weights_only=True). Every tensor is checked against the config (name, shape); the model's parameters
    are created without data and filled tensor by tensor, so memory stays at one copy of the weights.
    If a tokenizer.model sits beside the weights, its <|user|>/<|observation|> ids become stop tokens.
    """
    path = os.fspath(path)
    config = GLM3Config.from_hf(path)
    model = GLM3ForCausalLM(config, dtype=dtype, compute_dtype=compute_dtype, kernels_backend=kernels_backend,
                            param_init="lazy")
    params = {p.name: p for p in model.get_parameters()}
    target = to_ms_dtype(dtype)
    for name, array, _ in iter_checkpoint(path, config, skip_training_state=True):
        params[name].set_data(_as_param_data(array, target))
    if os.path.isfile(os.path.join(path, VOCAB_FILE)):
        tokenizer = ChatGLM3Tokenizer.from_pretrained(path)
        model.stop_token_ids = tokenizer.stop_token_ids[1:]
    model.set_train(False)
    return model


def save_model(model: GLM3ForCausalLM, directory: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               overwrite: bool = False) -> str:
    """Write a model directory in our MindSpore layout (config.json + mindspore_model.ckpt [+ tokenizer]).

    The directory appears complete or not at all. Returns its path.
    """
    directory = os.fspath(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config = model.config.replace(torch_dtype={ms.float32: "float32", ms.float16: "float16",
                                                   ms.bfloat16: "bfloat16"}[model.dtype])
        config.save(tmp)
        ms.save_checkpoint(model, os.path.join(tmp, MS_CKPT))
        if tokenizer_dir is not None:
            if not copy_tokenizer_files(tokenizer_dir, tmp):
                raise CheckpointError(f"no tokenizer files in {tokenizer_dir}")
    return directory

