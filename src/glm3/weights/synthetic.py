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

from glm3.io import atomic_directory, atomic_write_text, byte_progress, check_destination, exclusive_lock
from glm3.modeling.config import PRESETS, GLM3Config
from glm3.modeling.tokenizer import ChatGLM3Tokenizer, train_sentencepiece
from glm3.weights.checkpoint import (
    HF_BIN_INDEX,
    HF_INV_FREQ,
    HF_ST_INDEX,
    MS_EMBEDDING,
    float_shapes,
    hf_tensor_shapes,
    ms_to_hf_name,
    release_inv_freq,
)
from glm3.weights.tensor_files import SafetensorsWriter, safetensors_header_bound, storage_nbytes

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def shipped_corpus() -> str:
    """Path of the tokenizer training text shipped inside the package."""
    return str(resources.files("glm3") / "assets" / "tokenizer_corpus.txt")


def random_hf_weights(config: GLM3Config, seed: int = 0, dtype: str = "float32"):
    """Yield (hf_name, array) for every tensor of the release, in the release's order, one at a time."""
    rng = np.random.default_rng(seed)
    np_dtype = _NP_DTYPES[dtype]
    for name, shape in float_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        array = 1.0 + 0.1 * noise if name.endswith("layernorm.weight") else 0.05 * noise
        del noise
        yield ms_to_hf_name(name), array.astype(np_dtype, copy=False)
        if name == MS_EMBEDDING:
            yield HF_INV_FREQ, release_inv_freq(config).astype(np_dtype)


SYNTHETIC_DEFAULTS = {
    "glm3_6b": {"dtype": "float16", "num_shards": 7},
    "glm3_6b_32k": {"dtype": "float16", "num_shards": 7},
}


def write_synthetic_checkpoint(
    directory: str | os.PathLike,
    config: GLM3Config | str = "tiny",
    seed: int = 0,
    fmt: str = "safetensors",
    dtype: str | None = None,
    num_shards: int | None = None,
    tokenizer_vocab_size: int = 1500,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write a random-weight checkpoint in HuggingFace layout into `directory` (atomically); return its path.

    fmt: "safetensors" (model-0000N-of-0000M.safetensors + model.safetensors.index.json) or "bin"
    (pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json); num_shards=1 writes a single
    model.safetensors / pytorch_model.bin without index. dtype and num_shards default to the release's
    (float16, 7 shards) for the 6B presets, float32 and 2 shards otherwise. Memory: one shard at most.
    """
    defaults = SYNTHETIC_DEFAULTS.get(config if isinstance(config, str) else "", {})
    dtype = defaults.get("dtype", "float32") if dtype is None else dtype
    num_shards = defaults.get("num_shards", 2) if num_shards is None else num_shards
    if isinstance(config, str):
        config = GLM3Config.from_name(config)
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    directory = os.fspath(directory)
    check_destination(directory, sum(storage_nbytes(s, dtype) for _, s in hf_tensor_shapes(config)), overwrite)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        tokenizer_path = train_sentencepiece(
            [shipped_corpus()], os.path.join(tmp, "tokenizer.model"), vocab_size=tokenizer_vocab_size
        )
        tokenizer = ChatGLM3Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > config.padded_vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but padded_vocab_size is {config.padded_vocab_size}"
            )
        tokenizer.save_pretrained(tmp)
        config.replace(torch_dtype=dtype).save(tmp)
        _write_shards(tmp, config, seed, dtype, fmt, num_shards, progress)
    return directory


def _plan_shards(shapes: list[tuple[str, tuple[int, ...]]], dtype: str, num_shards: int) -> list[list[str]]:
    """Split tensors, in order, into up to num_shards groups of roughly equal bytes (like the release's).

    A tensor goes to the shard its byte midpoint falls in, so the count is exact unless single tensors
    are bigger than a shard.
    """
    sizes = [storage_nbytes(s, dtype) for _, s in shapes]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    start = 0
    for (name, _), size in zip(shapes, sizes):
        groups[min(num_shards - 1, (2 * start + size) * num_shards // (2 * total))].append(name)
        start += size
    return [g for g in groups if g]


def _write_shards(
    directory: str, config: GLM3Config, seed: int, dtype: str, fmt: str, num_shards: int, progress: bool
) -> None:
    shapes = hf_tensor_shapes(config)
    groups = _plan_shards(shapes, dtype, num_shards)
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    names = (
        [f"{stem}.{ext}"]
        if len(groups) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" for i in range(len(groups))]
    )
    tensors = random_hf_weights(config, seed, dtype)
    total = sum(storage_nbytes(s, dtype) for _, s in shapes)
    header_bound = safetensors_header_bound(shapes, {"format": "pt"})
    with byte_progress(total, "synthetic weights", progress) as bar:
        for group, fname in zip(groups, names):
            path = os.path.join(directory, fname)
            if fmt == "safetensors":
                writer = SafetensorsWriter(path, header_bound, {"format": "pt"})
                for _ in group:
                    name, array = next(tensors)
                    writer.add(name, array, dtype)
                    bar.update(array.nbytes)
                writer.close()
            else:
                import torch

                shard = {}
                for _ in group:
                    name, array = next(tensors)
                    shard[name] = torch.from_numpy(array)
                    bar.update(array.nbytes)
                torch.save(shard, path)
                del shard
    if len(groups) > 1:
        weight_map = {name: fname for group, fname in zip(groups, names) for name in group}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(
            os.path.join(directory, HF_ST_INDEX if fmt == "safetensors" else HF_BIN_INDEX),
            json.dumps(index, indent=2) + "\n",
        )


# Bumped when what write_synthetic_checkpoint writes changes, so an older cache is not linked into a new run
# (2: the tokenizer no longer records the path of its training text).
CACHE_VERSION = 2


def synthetic_cache_dir() -> str:
    """Where cached synthetic checkpoints live: GLM3_SYNTHETIC_CACHE, default ~/.cache/glm3/synthetic."""
    return os.environ.get("GLM3_SYNTHETIC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "glm3", "synthetic"))


def cached_synthetic_checkpoint(
    directory: str | os.PathLike,
    preset: str,
    seed: int = 0,
    fmt: str = "safetensors",
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """A synthetic checkpoint in `directory` whose files are hard links into a cache outside the project.

    The first call writes it into the cache (keyed by preset, seed and format; 145 s and 12.5 GB for
    glm3_6b); later calls, in this or another checkout, link its files in seconds and take no space, as
    the HuggingFace cache does for downloads. Falls back to copying where links are impossible.
    """
    import shutil

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    cached = os.path.join(synthetic_cache_dir(), f"{preset}-seed{seed}-{fmt}-v{CACHE_VERSION}")
    check_destination(directory, 0, overwrite)
    # Concurrent runs (DVC and Prefect, or two projects) wait for the first writer instead of replacing its
    # files while it links them.
    with exclusive_lock(cached + ".lock", f"the synthetic checkpoint cache {cached}", wait=True):
        if not os.path.isfile(os.path.join(cached, "config.json")):
            write_synthetic_checkpoint(cached, preset, seed=seed, fmt=fmt, overwrite=True, progress=progress)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            for name in sorted(os.listdir(cached)):
                try:
                    os.link(os.path.join(cached, name), os.path.join(tmp, name))
                except OSError:
                    shutil.copy2(os.path.join(cached, name), os.path.join(tmp, name))
    return os.fspath(directory)
