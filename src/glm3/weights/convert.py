"""Checkpoint conversion between HuggingFace (PyTorch) and MindSpore layouts, streaming.

HF -> MindSpore reads any layout glm3 understands (HF .bin or safetensors, sharded or not, MindFormers'
single .ckpt, our own layout) and writes MindSpore checkpoint shards (.ckpt, or .safetensors) plus an
index, config.json and the tokenizer files. MindSpore -> HF writes `model-0000N-of-0000M.safetensors`,
`model.safetensors.index.json` and config.json, which the HuggingFace ChatGLM3 code loads.

Memory stays at one source shard plus one tensor: tensors are validated and written one at a time
(glm3.weights.checkpoint.iter_checkpoint, glm3.weights.tensor_files). The destination is built in a temporary directory
beside it and renamed into place only when complete, so a failure or a kill leaves no partial result.
"""

from __future__ import annotations

import dataclasses
import os
import time

from glm3.io import atomic_directory, byte_progress, check_destination
from glm3.modeling.config import PRESETS, ConfigError, GLM3Config
from glm3.modeling.tokenizer import copy_tokenizer_files
from glm3.weights.checkpoint import (
    HF_INV_FREQ,
    HF_ST_INDEX,
    MS_CKPT_INDEX,
    MS_EMBEDDING,
    MS_ST_INDEX,
    CheckpointError,
    expected_shapes,
    hf_tensor_shapes,
    iter_checkpoint,
    ms_to_hf_name,
    release_inv_freq,
)
from glm3.weights.shards import DEFAULT_SHARD_SIZE, ShardedWriter, parse_size
from glm3.weights.tensor_files import STORAGE_DTYPES, safetensors_header_bound, storage_nbytes


@dataclasses.dataclass
class ConvertSummary:
    src: str
    dst: str
    to: str
    format: str
    dtype: str
    tensors: int
    bytes: int
    files: list[str]
    seconds: float
    skipped_training_state: int
    tokenizer: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        text = (
            f"converted {self.tensors} tensors, {self.bytes / 1e9:.3f} GB as {self.dtype}, into "
            f"{len(self.files)} {self.format} file(s) in {self.seconds:.1f} s ({rate:.0f} MB/s): {self.dst}"
        )
        if self.skipped_training_state:
            text += f"\nskipped {self.skipped_training_state} optimizer/training-state entries of the source"
        if not self.tokenizer:
            text += "\nwarning: no tokenizer files found (pass --tokenizer DIR); the model cannot chat without them"
        return text


def resolve_config(spec: str | GLM3Config | None, directory: str) -> GLM3Config:
    """The config of a conversion: a preset name, a config.json (or its folder), or the source's own."""
    if isinstance(spec, GLM3Config):
        return spec
    if spec is None:
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ConfigError(
                f"no config.json in {directory}; pass --config with a preset "
                f"({', '.join(sorted(PRESETS))}) or the path of a config.json"
            )
        return GLM3Config.from_hf(directory)
    if spec in PRESETS:
        return GLM3Config.from_name(spec)
    if os.path.exists(spec):
        return GLM3Config.from_hf(spec)
    raise ConfigError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json path")


def _source(src: str) -> tuple[str, list[str] | None]:
    """(directory, explicit files) of a source: a model directory or a single MindSpore .ckpt file."""
    if os.path.isfile(src):
        if not src.endswith(".ckpt"):
            raise CheckpointError(f"{src} is a file but not a .ckpt; pass a model directory or a MindSpore .ckpt")
        return os.path.dirname(os.path.abspath(src)), [src]
    if not os.path.isdir(src):
        raise CheckpointError(f"source not found: {src}")
    return src, None


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "mindspore",
    dtype: str = "auto",
    fmt: str = "ckpt",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    config: str | GLM3Config | None = None,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Convert a checkpoint directory (or a MindFormers .ckpt file) and return what was done.

    to: "mindspore" (fmt "ckpt" or "safetensors") or "hf" (always safetensors). dtype: "auto" keeps the
    config's torch_dtype, else float32/float16/bfloat16. shard_size: bytes per output file ("2GB";
    0 writes a single file). config: preset or config.json when the source has none (MindFormers'
    glm3_6b.ckpt). tokenizer: directory with tokenizer.model if the source has none beside it.
    RoPE's inv_freq buffer is checked against the config and dropped on the way in, and recomputed
    from the config on the way out to HF.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in ("mindspore", "hf"):
        raise ValueError(f"to must be 'mindspore' or 'hf', got {to!r}")
    if to == "hf":
        fmt = "safetensors"
    if fmt not in ("ckpt", "safetensors"):
        raise ValueError(f"format must be 'ckpt' or 'safetensors', got {fmt!r}")
    directory, files = _source(src)
    cfg = resolve_config(config, directory)
    if cfg.quantization is not None:
        raise ValueError(
            f"{src} is a quantized model ({cfg.quantization.bits} bits): convert its float source instead "
            "(quantization is the last step: glm3 quantize)"
        )
    out_dtype = (cfg.torch_dtype if cfg.torch_dtype in STORAGE_DTYPES else "float32") if dtype == "auto" else dtype
    if out_dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(shard_size)

    out_names = list(expected_shapes(cfg).items()) if to == "mindspore" else hf_tensor_shapes(cfg)
    total = sum(storage_nbytes(s, out_dtype) for _, s in out_names)
    check_destination(dst, total, overwrite, src=directory if files is None else None)

    if to == "mindspore":
        stem = "mindspore_model"
        index_name = MS_CKPT_INDEX if fmt == "ckpt" else MS_ST_INDEX
        metadata = None
    else:
        stem, index_name, metadata = "model", HF_ST_INDEX, {"format": "pt"}  # transformers requires format=pt
    header_bound = safetensors_header_bound(out_names, metadata)

    skipped: list[str] = []
    start = time.perf_counter()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        out = ShardedWriter(tmp, stem, fmt, shard_bytes, header_bound, metadata)
        try:
            with byte_progress(total, f"convert to {to}", progress, mininterval=0.5) as bar:
                for name, array, _ in iter_checkpoint(
                    directory, cfg, files=files, skip_training_state=True, skipped=skipped
                ):
                    out.add(name if to == "mindspore" else ms_to_hf_name(name), array, out_dtype)
                    bar.update(storage_nbytes(array.shape, out_dtype))
                    del array
                    if to == "hf" and name == MS_EMBEDDING:
                        out.add(HF_INV_FREQ, release_inv_freq(cfg), out_dtype)
            names = out.finish(index_name)
        except BaseException:
            out.abort()
            raise
        cfg.replace(torch_dtype=out_dtype).save(tmp)
        has_tokenizer = bool(copy_tokenizer_files(os.fspath(tokenizer) if tokenizer else directory, tmp))
        if tokenizer and not has_tokenizer:
            raise CheckpointError(f"no tokenizer files (tokenizer.model) in {tokenizer}")
    return ConvertSummary(
        src=src,
        dst=dst,
        to=to,
        format=fmt,
        dtype=out_dtype,
        tensors=len(out_names),
        bytes=total,
        files=names,
        seconds=time.perf_counter() - start,
        skipped_training_state=len(skipped),
        tokenizer=has_tokenizer,
    )
