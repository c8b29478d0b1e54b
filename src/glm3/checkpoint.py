"""Checkpoint layouts, the HuggingFace <-> MindSpore weight-name map, and validated tensor streaming.

Names: ours (= MindFormers') are the HuggingFace names with `word_embeddings.weight` renamed
`embedding_table`. HF's `transformer.rotary_pos_emb.inv_freq` is a recomputable buffer: it is checked
for shape and skipped (the model derives RoPE tables from the config).

Readers yield (name, numpy array) one tensor at a time and hold at most one source shard open, so
loading or converting a 6B checkpoint never needs a second full copy in memory.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np

from glm3.config import GLM3Config

HF_EMBEDDING = "transformer.embedding.word_embeddings.weight"
MS_EMBEDDING = "transformer.embedding.embedding_table"
HF_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

MS_CKPT = "mindspore_model.ckpt"
MS_CKPT_INDEX = "mindspore_model.ckpt.index.json"
HF_ST_INDEX = "model.safetensors.index.json"
HF_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match its config."""


# ------------------------------------------------------------------------------------------ names
def hf_to_ms_name(name: str) -> str:
    return MS_EMBEDDING if name == HF_EMBEDDING else name


def ms_to_hf_name(name: str) -> str:
    return HF_EMBEDDING if name == MS_EMBEDDING else name


def expected_shapes(config: GLM3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, by MindSpore name, with its shape (PyTorch [out, in] for linears)."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    shapes: dict[str, tuple[int, ...]] = {MS_EMBEDDING: (v, h)}
    for i in range(config.num_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = (config.qkv_size, h)
        if config.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (config.qkv_size,)
        shapes[p + "self_attention.dense.weight"] = (h, config.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        if config.add_bias_linear:
            shapes[p + "self_attention.dense.bias"] = (h,)
            shapes[p + "mlp.dense_h_to_4h.bias"] = (2 * f,)
            shapes[p + "mlp.dense_4h_to_h.bias"] = (h,)
    if config.post_layer_norm:
        shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (v, h)
    return shapes


def inv_freq_shape(config: GLM3Config) -> tuple[int]:
    return (config.rotary_dim // 2,)


# ----------------------------------------------------------------------------------------- layout
def detect_layout(directory: str) -> tuple[str, list[str]]:
    """(kind, files) of the checkpoint in a model directory.

    kind is "ms_ckpt", "safetensors" or "torch_bin"; files are in load order. An index file, when
    present, is authoritative: every shard it names must exist.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"model directory not found: {directory}")
    for kind, index_name in (("ms_ckpt", MS_CKPT_INDEX), ("safetensors", HF_ST_INDEX), ("torch_bin", HF_BIN_INDEX)):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            return kind, _files_from_index(directory, index_path)
    ckpts = sorted(glob.glob(os.path.join(directory, "*.ckpt")))
    if ckpts:
        if len(ckpts) > 1:
            raise CheckpointError(f"{directory} holds several .ckpt files and no {MS_CKPT_INDEX}: "
                                  f"{', '.join(os.path.basename(c) for c in ckpts)}")
        return "ms_ckpt", ckpts
    sts = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if sts:
        return "safetensors", sts
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if bins:
        if len(bins) > 1:
            raise CheckpointError(f"{directory} holds several pytorch_model*.bin shards but no {HF_BIN_INDEX}")
        return "torch_bin", bins
    raise CheckpointError(f"no checkpoint in {directory}: expected {MS_CKPT}, *.ckpt, *.safetensors "
                          "(with or without model.safetensors.index.json) or pytorch_model*.bin")


def read_index(index_path: str) -> dict[str, str]:
    """The weight_map of an index file, validated."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read index {index_path}: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: tensor {name} maps to an invalid shard name {shard!r}")
    return weight_map


def _files_from_index(directory: str, index_path: str) -> list[str]:
    weight_map = read_index(index_path)
    files = sorted(set(weight_map.values()))
    for shard in files:
        if not os.path.isfile(os.path.join(directory, shard)):
            raise CheckpointError(f"{index_path} lists shard {shard}, which is missing from {directory}")
    return [os.path.join(directory, s) for s in files]


# ---------------------------------------------------------------------------------------- readers
def _torch():
    import torch

    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    torch = _torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()  # numpy has no bfloat16; float32 holds it exactly
    return tensor.numpy()


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, _torch_to_numpy(f.get_tensor(name))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a PyTorch pickle, loaded with weights_only=True (no code in the file can run)."""
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    for name in list(state):
        tensor = state.pop(name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name} is not a tensor")
        yield name, _torch_to_numpy(tensor)


def iter_ms_ckpt(path: str) -> Iterator[tuple[str, np.ndarray]]:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path, format="ckpt")
    except Exception as exc:
        raise CheckpointError(f"cannot load MindSpore checkpoint {path}: {exc}") from exc
    for name in list(params):
        param = params.pop(name)
        if param.dtype == ms.bfloat16:
            yield name, param.astype(ms.float32).asnumpy()
        else:
            yield name, param.asnumpy()


_READERS = {"ms_ckpt": iter_ms_ckpt, "safetensors": iter_safetensors, "torch_bin": iter_torch_bin}


def iter_checkpoint(directory: str, config: GLM3Config) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (ms_name, array, source_file) for every weight of a model directory, validated.

    Raises CheckpointError naming the tensor and file for an unexpected or duplicated name or a wrong
    shape; after the last tensor, for any expected tensor that never appeared.
    """
    kind, files = detect_layout(directory)
    expected = expected_shapes(config)
    seen: dict[str, str] = {}
    for path in files:
        for raw_name, array in _READERS[kind](path):
            where = os.path.basename(path)
            if raw_name == HF_INV_FREQ:
                if tuple(array.shape) != inv_freq_shape(config):
                    raise CheckpointError(f"{HF_INV_FREQ} in {where} has shape {tuple(array.shape)}, expected "
                                          f"{inv_freq_shape(config)} for kv_channels={config.kv_channels}")
                continue
            name = hf_to_ms_name(raw_name)
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {raw_name} in {where} (not part of a {config.num_layers}-layer "
                                      "ChatGLM3 with this config)")
            if name in seen:
                raise CheckpointError(f"tensor {raw_name} appears twice: in {seen[name]} and in {where}")
            if tuple(array.shape) != expected[name]:
                raise CheckpointError(f"tensor {raw_name} in {where} has shape {tuple(array.shape)}, "
                                      f"expected {expected[name]}")
            if array.dtype.kind != "f":
                raise CheckpointError(f"tensor {raw_name} in {where} has dtype {array.dtype}, expected a float type")
            seen[name] = where
            yield name, array, where
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(ms_to_hf_name(n) for n in missing[:5])
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {directory}: {shown}"
                              + (" ..." if len(missing) > 5 else ""))
