"""Random-weight ChatGLM3 checkpoints in the exact HuggingFace layout of the release (offline stand-ins).

Used by the embedded default and by tests: config.json, weight shards + index (safetensors or
pytorch_model-0000N-of-0000M.bin), tokenizer.model trained from the corpus shipped with the package, and
tokenizer_config.json. Seeded: the same arguments give the same files.
"""
from __future__ import annotations

import json
import os
from importlib import resources

import numpy as np

from glm3.checkpoint import HF_BIN_INDEX, HF_INV_FREQ, HF_ST_INDEX, expected_shapes, inv_freq_shape, ms_to_hf_name
from glm3.config import GLM3Config
from glm3.io import atomic_directory, atomic_write_text
from glm3.tokenizer import ChatGLM3Tokenizer, train_sentencepiece

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def shipped_corpus() -> str:
    """Path of the tokenizer training text shipped inside the package."""
    return str(resources.files("glm3") / "assets" / "tokenizer_corpus.txt")


def random_hf_weights(config: GLM3Config, seed: int = 0, dtype: str = "float32"):
    """Yield (hf_name, array) for every tensor of the release, in the release's order, one at a time."""
    rng = np.random.default_rng(seed)
    np_dtype = _NP_DTYPES[dtype]
    for name, shape in expected_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        array = 1.0 + 0.1 * noise if name.endswith("layernorm.weight") else 0.05 * noise
        yield ms_to_hf_name(name), array.astype(np_dtype)
        if name == "transformer.embedding.embedding_table":
            rot = config.rotary_dim
            inv_freq = 1.0 / (10000.0 ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
            assert inv_freq.shape == inv_freq_shape(config)
            yield HF_INV_FREQ, inv_freq.astype(np_dtype)


def write_synthetic_checkpoint(directory: str | os.PathLike, config: GLM3Config | str = "tiny", seed: int = 0,
                               fmt: str = "safetensors", dtype: str = "float32", num_shards: int = 2,
                               tokenizer_vocab_size: int = 1500, overwrite: bool = False) -> str:
    """Write a random-weight checkpoint in HuggingFace layout into `directory` (atomically); return its path.

    fmt: "safetensors" (model-0000N-of-0000M.safetensors + model.safetensors.index.json) or "bin"
    (pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json); num_shards=1 writes a single
    model.safetensors / pytorch_model.bin without index.
    """
    if isinstance(config, str):
        config = GLM3Config.from_name(config)
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    directory = os.fspath(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        tokenizer_path = train_sentencepiece([shipped_corpus()], os.path.join(tmp, "tokenizer.model"),
                                             vocab_size=tokenizer_vocab_size)
        tokenizer = ChatGLM3Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > config.padded_vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but padded_vocab_size is "
                             f"{config.padded_vocab_size}")
        tokenizer.save_pretrained(tmp)
        config.replace(torch_dtype=dtype).save(tmp)
        _write_shards(tmp, random_hf_weights(config, seed, dtype), expected_bytes(config, dtype), fmt, num_shards)
    return directory


def expected_bytes(config: GLM3Config, dtype: str) -> int:
    item = np.dtype(_NP_DTYPES[dtype]).itemsize
    return sum(int(np.prod(s)) for s in expected_shapes(config).values()) * item


def _write_shards(directory: str, tensors, total_bytes: int, fmt: str, num_shards: int) -> None:
    per_shard = -(-total_bytes // num_shards)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors:
        if size >= per_shard and len(shards) < num_shards:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}.{ext}" if num_shards == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        _save(os.path.join(directory, fname), shard, fmt)
        weight_map.update({name: fname for name in shard})
    if num_shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        atomic_write_text(os.path.join(directory, HF_ST_INDEX if fmt == "safetensors" else HF_BIN_INDEX),
                          json.dumps(index, indent=2) + "\n")


def _save(path: str, tensors: dict[str, np.ndarray], fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, path, metadata={"format": "pt"})
    else:
        import torch

        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)
