"""Checkpoint layouts, the HuggingFace <-> MindSpore weight-name map, and validated tensor streaming.

Names: ours (= MindFormers') are the HuggingFace names with `word_embeddings.weight` renamed
`embedding_table`. HF's `transformer.rotary_pos_emb.inv_freq` is a recomputable buffer: it is checked
for shape and skipped (the model derives RoPE tables from the config).

iter_checkpoint yields (name, numpy array) one tensor at a time and holds at most one source shard
open (see glm3.weights.tensor_files), so loading or converting a 6B checkpoint never needs a second copy in memory.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np

from glm3.modeling.config import GLM3Config, rope_inv_freq
from glm3.quantization import scale_name
from glm3.weights.tensor_files import TensorFileError, iter_ms_ckpt, iter_safetensors, iter_torch_bin

HF_EMBEDDING = "transformer.embedding.word_embeddings.weight"
MS_EMBEDDING = "transformer.embedding.embedding_table"
HF_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
RELEASE_INV_FREQ_BASE = 10000.0  # the base of the stored inv_freq buffer in every release, 32k included

MS_CKPT = "mindspore_model.ckpt"
MS_CKPT_INDEX = "mindspore_model.ckpt.index.json"
MS_SAFETENSORS = "mindspore_model.safetensors"
MS_ST_INDEX = "mindspore_model.safetensors.index.json"
HF_SAFETENSORS = "model.safetensors"
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
    """Every tensor of the model's checkpoint, by MindSpore name, with its shape (PyTorch [out, in] for linears);
    for a quantized config, quantized weights as stored and their scales beside them (glm3.quantization)."""
    shapes = float_shapes(config)
    q = config.quantization
    if q is None:
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if q.covers(name):
            q.check_shape(name, shape)
            out[name] = q.stored_shape(shape)
            out[scale_name(name)] = q.scale_shape(shape)
        else:
            out[name] = shape
    return out


def expected_dtypes(config: GLM3Config) -> dict[str, str]:
    """The exact storage dtype of the tensors that must have one: a quantized model's data (int8 / uint8) and
    scales (float16). Every other tensor is a floating-point weight of any float dtype."""
    q = config.quantization
    if q is None:
        return {}
    out = {}
    for name in float_shapes(config):
        if q.covers(name):
            out[name], out[scale_name(name)] = q.storage_dtype, "float16"
    return out


def float_shapes(config: GLM3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the float model, by MindSpore name, with its shape (PyTorch [out, in] for linears)."""
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


def hf_tensor_shapes(config: GLM3Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an HF checkpoint, in the release's order (inv_freq included)."""
    out = []
    for name, shape in expected_shapes(config).items():
        out.append((ms_to_hf_name(name), shape))
        if name == MS_EMBEDDING:
            out.append((HF_INV_FREQ, inv_freq_shape(config)))
    return out


# Entries of training checkpoints (MindFormers/MindSpore optimizer and loss-scale state) that carry no
# model weight; a converter skips them instead of failing on them.
_TRAINING_STATE_PREFIXES = (
    "adam_m.",
    "adam_v.",
    "moment1.",
    "moment2.",
    "accu_grads.",
    "accumulated_grads.",
    "global_norm",
    "lamb_m.",
    "lamb_v.",
    "accum.",
)
_TRAINING_STATE_NAMES = {
    "global_step",
    "learning_rate",
    "beta1_power",
    "beta2_power",
    "scale_sense",
    "current_iterator_step",
    "last_overflow_iterator_step",
    "epoch_num",
    "step_num",
    "loss_scale",
    "loss_scale_value",
    "loss_scale_clean_steps",
}


def is_training_state(name: str) -> bool:
    return name in _TRAINING_STATE_NAMES or name.startswith(_TRAINING_STATE_PREFIXES)


# ----------------------------------------------------------------------------------------- layout
_INDEXED = (
    ("ms_ckpt", MS_CKPT_INDEX),
    ("safetensors", MS_ST_INDEX),
    ("safetensors", HF_ST_INDEX),
    ("torch_bin", HF_BIN_INDEX),
)


def detect_layout(directory: str) -> tuple[str, list[str], dict[str, str] | None]:
    """(kind, files, weight_map) of the checkpoint in a model directory.

    kind is "ms_ckpt", "safetensors" or "torch_bin"; files are in load order. An index file, when
    present, is authoritative: every shard it names must exist, and weight_map (tensor name -> shard
    file name) is returned so readers can check each tensor sits where the index says.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"model directory not found: {directory}")
    for kind, index_name in _INDEXED:
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            weight_map = read_index(index_path)
            files = sorted(set(weight_map.values()))
            for shard in files:
                if not os.path.isfile(os.path.join(directory, shard)):
                    raise CheckpointError(f"{index_path} lists shard {shard}, which is missing from {directory}")
            return kind, [os.path.join(directory, s) for s in files], weight_map
    ckpts = sorted(glob.glob(os.path.join(directory, "*.ckpt")))
    if ckpts:
        if len(ckpts) > 1:
            raise CheckpointError(
                f"{directory} holds several .ckpt files and no {MS_CKPT_INDEX}: "
                f"{', '.join(os.path.basename(c) for c in ckpts)}"
            )
        return "ms_ckpt", ckpts, None
    sts = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if sts:
        if len(sts) > 1:
            raise CheckpointError(f"{directory} holds several .safetensors files but no {HF_ST_INDEX}")
        return "safetensors", sts, None
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if bins:
        if len(bins) > 1:
            raise CheckpointError(f"{directory} holds several pytorch_model*.bin shards but no {HF_BIN_INDEX}")
        return "torch_bin", bins, None
    raise CheckpointError(
        f"no checkpoint in {directory}: expected {MS_CKPT}, *.ckpt, *.safetensors "
        "(with or without model.safetensors.index.json) or pytorch_model*.bin"
    )


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


# ---------------------------------------------------------------------------------------- reading
def _read_file(kind: str, path: str, skip_training_state: bool, skipped: list[str]):
    if kind == "ms_ckpt":

        def want(name: str) -> bool:
            if skip_training_state and is_training_state(name):
                skipped.append(name)
                return False
            return True

        return iter_ms_ckpt(path, want=want)
    return iter_safetensors(path) if kind == "safetensors" else iter_torch_bin(path)


def release_inv_freq(config: GLM3Config) -> np.ndarray:
    """The `inv_freq` buffer as the release stores it: at base 10000 whatever the rope_ratio (the official code
    recomputes the frequencies from base * rope_ratio at run time and uses the buffer only for its dtype)."""
    return rope_inv_freq(config.rotary_dim, RELEASE_INV_FREQ_BASE)


def _check_inv_freq(array: np.ndarray, config: GLM3Config, where: str) -> None:
    """inv_freq is dropped (the model derives RoPE from config.json), after checking it is the buffer of a model
    of this head size: base 10000 as the release writes it, or base 10000 * rope_ratio as some converters do.

    It cannot tell a lost rope_ratio (the 32k release's buffer is at base 10000 too): config.json decides.
    """
    if tuple(array.shape) != inv_freq_shape(config):
        raise CheckpointError(
            f"{HF_INV_FREQ} in {where} has shape {tuple(array.shape)}, expected "
            f"{inv_freq_shape(config)} for kv_channels={config.kv_channels}"
        )
    got = array.astype(np.float32)
    if not any(
        np.allclose(got, rope_inv_freq(config.rotary_dim, base), rtol=2e-3, atol=0)
        for base in (RELEASE_INV_FREQ_BASE, config.rope_base)
    ):
        raise CheckpointError(
            f"{HF_INV_FREQ} in {where} is not a RoPE buffer of this model (base "
            f"{RELEASE_INV_FREQ_BASE:g}, as released, or {config.rope_base:g}, rope_ratio "
            f"{config.rope_ratio:g}): the checkpoint and config.json disagree"
        )


def iter_checkpoint(
    directory: str,
    config: GLM3Config,
    files: list[str] | None = None,
    skip_training_state: bool = False,
    skipped: list[str] | None = None,
) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (ms_name, array, source_file) for every weight of a model directory, validated.

    Raises CheckpointError naming the tensor and file for an unexpected or duplicated name, a wrong
    shape or dtype, a tensor that is not where the index says, a truncated or corrupt file; and after
    the last tensor, for any expected tensor that never appeared. `files` reads given .ckpt files
    instead of detecting the layout (MindFormers' single-file checkpoints); skip_training_state drops
    optimizer/loss-scale entries of training checkpoints (their names are appended to `skipped`).
    """
    skipped = [] if skipped is None else skipped
    if files is None:
        kind, files, weight_map = detect_layout(directory)
    else:
        kind, weight_map = "ms_ckpt", None
    expected = expected_shapes(config)
    exact = expected_dtypes(config)
    seen: dict[str, str] = {}
    for path in files:
        where = os.path.basename(path)
        try:
            for raw_name, array in _read_file(kind, path, skip_training_state, skipped):
                if weight_map is not None and weight_map.get(raw_name) != where:
                    listed = weight_map.get(raw_name)
                    raise CheckpointError(
                        f"tensor {raw_name} is in {where} but the index "
                        + (f"maps it to {listed}" if listed else "does not list it")
                    )
                if raw_name == HF_INV_FREQ:
                    _check_inv_freq(array, config, where)
                    continue
                name = hf_to_ms_name(raw_name)
                if name not in expected:
                    raise CheckpointError(
                        f"unexpected tensor {raw_name} in {where} (not part of a "
                        f"{config.num_layers}-layer ChatGLM3 with this config)"
                    )
                if name in seen:
                    raise CheckpointError(f"tensor {raw_name} appears twice: in {seen[name]} and in {where}")
                if tuple(array.shape) != expected[name]:
                    raise CheckpointError(
                        f"tensor {raw_name} in {where} has shape {tuple(array.shape)}, expected {expected[name]}"
                    )
                if name in exact and array.dtype != np.dtype(exact[name]):
                    raise CheckpointError(
                        f"tensor {raw_name} in {where} has dtype {array.dtype}, expected {exact[name]} "
                        "(a quantized model's data and scales)"
                    )
                if name not in exact and array.dtype.kind != "f":
                    raise CheckpointError(
                        f"tensor {raw_name} in {where} has dtype {array.dtype}, expected a float type"
                    )
                seen[name] = where
                yield name, array, where
        except TensorFileError as exc:
            raise CheckpointError(str(exc)) from exc
    missing = [n for n in expected if n not in seen]
    if missing:

        def place(n: str) -> str:
            listed = weight_map.get(ms_to_hf_name(n)) if weight_map else None
            return f"{ms_to_hf_name(n)} (the index puts it in {listed})" if listed else ms_to_hf_name(n)

        shown = ", ".join(place(n) for n in missing[:5])
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {directory}: {shown}" + (" ..." if len(missing) > 5 else "")
        )
