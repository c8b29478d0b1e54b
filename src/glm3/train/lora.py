"""LoRA adapters for GLM3ForCausalLM: inject, save separately, load, and merge into the base weights.

An adapter directory holds `adapter_config.json` (rank, alpha, dropout, targets, the base model's shape)
and `adapter_model.ckpt` with the `…lora_a` / `…lora_b` tensors, named after the Linear they adapt.
Merging computes W + B·A·alpha/rank in float32 and writes a plain model directory that needs no adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os

import mindspore as ms
import numpy as np

from glm3.io import atomic_directory
from glm3.modeling.config import GLM3Config
from glm3.modeling.linear import Linear
from glm3.modeling.model import GLM3ForCausalLM
from glm3.train.settings import LORA_TARGETS, LoraConfig, LoraError  # noqa: F401 (re-exported)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.ckpt"


def adapter_shapes(model_config: GLM3Config, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every adapter tensor of `config` on a model of `model_config`, by name: `<linear>.lora_a` [rank, in] and
    `<linear>.lora_b` [out, rank] for each target Linear of every layer."""
    from glm3.weights.checkpoint import float_shapes as expected_shapes

    shapes = {}
    for name, (out, inp) in ((n, s) for n, s in expected_shapes(model_config).items() if len(s) == 2):
        prefix = name[: -len(".weight")]
        if ".encoder.layers." in name and prefix.rsplit(".", 1)[-1] in config.targets:
            shapes[f"{prefix}.lora_a"] = (config.rank, inp)
            shapes[f"{prefix}.lora_b"] = (out, config.rank)
    return shapes


def fold_adapter(
    tensors, model_config: GLM3Config, config: LoraConfig, adapter: dict[str, np.ndarray], where: str = "the adapter"
):
    """Stream (name, array) of a base model with every adapter folded in: W + B·A·alpha/rank for each target
    weight, computed in float32 (the caller stores the result in the base's dtype). Memory: one base tensor
    and its float32 sum at a time; `adapter` (all lora_a/lora_b tensors) is checked against the config first."""
    expected = adapter_shapes(model_config, config)
    missing, extra = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
    if missing or extra:
        raise LoraError(
            f"{where} does not match its config (rank {config.rank}, targets {list(config.targets)}): "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, value in adapter.items():
        if tuple(value.shape) != expected[name] or value.dtype.kind != "f":
            raise LoraError(f"{where}: {name} is {value.dtype}{tuple(value.shape)}, expected float{expected[name]}")
    scale = np.float32(config.alpha / config.rank)
    for name, array in tensors:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and f"{prefix}.lora_a" in adapter:
            a = adapter[f"{prefix}.lora_a"].astype(np.float32, copy=False)
            b = adapter[f"{prefix}.lora_b"].astype(np.float32, copy=False)
            array = array.astype(np.float32) + (b @ a) * scale
        yield name, array


def _target_linears(model: GLM3ForCausalLM, targets) -> list[tuple[str, Linear]]:
    found = [
        (name, cell)
        for name, cell in model.cells_and_names()
        if isinstance(cell, Linear) and name.rsplit(".", 1)[-1] in targets and ".encoder." in f".{name}"
    ]
    if not found:
        raise LoraError(f"no Linear layer named {list(targets)} in the model")
    return found


def apply_lora(model: GLM3ForCausalLM, config: LoraConfig, seed: int | None = None) -> list[str]:
    """Add adapters to the target layers and freeze everything else. Returns the adapter parameter names."""
    if seed is not None:
        ms.set_seed(seed)
    names = []
    model.freeze_base()
    for name, cell in _target_linears(model, config.targets):
        cell.add_lora(config.rank, config.alpha)
        # Parameters added after the model was built keep their short names; give them their full path.
        cell.lora_a.name, cell.lora_b.name = f"{name}.lora_a", f"{name}.lora_b"
        cell.lora_a.init_data()
        cell.lora_b.init_data()
        names += [cell.lora_a.name, cell.lora_b.name]
    model.lora_config = config
    model.structure_changed()
    return names


class LoraDropout:
    """Inverted-dropout masks for every adapter, drawn on the host from a seeded numpy generator.

    MindSpore's CPU dropout kernels keep a hidden per-kernel state that a checkpoint cannot capture; drawing
    the masks here makes them part of the training state (`state()` / `restore()`), so resume is exact.
    """

    def __init__(self, model: GLM3ForCausalLM, rows: int, seed: int):
        config: LoraConfig = model.lora_config
        self.p = config.dropout
        self.keep_scale = np.float32(1.0 / (1.0 - self.p))
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.cells = [cell for _, cell in _target_linears(model, config.targets)] if self.p > 0 else []
        for cell in self.cells:
            cell.lora_mask = ms.Parameter(
                ms.Tensor(np.ones((rows, cell.in_features), np.float32)),
                name=f"{cell.lora_a.name[: -len('.lora_a')]}.lora_mask",
                requires_grad=False,
            )
        model.structure_changed()

    def refresh(self) -> None:
        for cell in self.cells:
            keep = self.rng.random(cell.lora_mask.shape, dtype=np.float32) >= self.p
            mask = keep.astype(np.float32) * self.keep_scale
            cell.lora_mask.set_data(ms.Tensor(mask))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def adapter_parameters(model: GLM3ForCausalLM) -> list[ms.Parameter]:
    return [p for p in model.get_parameters() if p.name.endswith((".lora_a", ".lora_b"))]


def save_adapter(model: GLM3ForCausalLM, directory: str | os.PathLike, overwrite: bool = False) -> str:
    """Write the adapter (config + LoRA tensors only) as a directory that appears whole or not at all."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise LoraError("the model has no LoRA adapters")
    directory = os.fspath(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        meta = {
            "peft_type": "LORA",
            **dataclasses.asdict(config),
            "targets": list(config.targets),
            "base_config": model.config.to_hf(),
        }
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        ms.save_checkpoint(
            [{"name": p.name, "data": p} for p in adapter_parameters(model)], os.path.join(tmp, ADAPTER_WEIGHTS)
        )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, dict]:
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise LoraError(f"{directory} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        config = LoraConfig(int(meta["rank"]), float(meta["alpha"]), float(meta["dropout"]), tuple(meta["targets"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoraError(f"{path} is not a valid adapter config: {exc!r}") from None
    base = meta.get("base_config", {})
    if not isinstance(base, dict):
        raise LoraError(f"{path}: base_config must be an object")
    return config, base


def check_adapter_base(base: dict, config: GLM3Config, where) -> None:
    """An adapter's recorded base config (adapter_config.json) must describe the model it is applied to."""
    if not base:
        return
    want = GLM3Config.from_hf(base)
    for field in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "kv_channels",
        "num_attention_heads",
        "multi_query_group_num",
        "padded_vocab_size",
    ):
        if getattr(want, field) != getattr(config, field):
            raise LoraError(
                f"adapter {where} was trained on a model with {field}={getattr(want, field)}, "
                f"this model has {getattr(config, field)}"
            )


def adapter_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The adapter tensors of an adapter directory, read with the streaming .ckpt reader."""
    from glm3.weights.tensor_files import TensorFileError, iter_ms_ckpt

    path = os.path.join(os.fspath(directory), ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise LoraError(f"{directory} has no {ADAPTER_WEIGHTS}")
    try:
        return dict(iter_ms_ckpt(path))
    except TensorFileError as exc:
        raise LoraError(str(exc)) from exc


def load_adapter(model: GLM3ForCausalLM, directory: str | os.PathLike) -> GLM3ForCausalLM:
    """Add the saved adapter to a loaded base model, checking names, shapes and dtypes of every tensor."""
    config, base = read_adapter_config(directory)
    check_adapter_base(base, model.config, directory)
    apply_lora(model, config)
    params = {p.name: p for p in adapter_parameters(model)}
    saved = adapter_weights(directory)
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise LoraError(f"adapter {directory} does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in saved.items():
        if tuple(value.shape) != tuple(params[name].shape) or value.dtype != np.float32:
            raise LoraError(
                f"adapter tensor {name} is {value.dtype}{tuple(value.shape)}, expected "
                f"float32{tuple(params[name].shape)}"
            )
        params[name].set_data(ms.Tensor(value))
    return model


def merge_lora(model: GLM3ForCausalLM) -> GLM3ForCausalLM:
    """Fold every adapter into its base weight (W += B·A·alpha/rank, computed in float32) and remove it."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise LoraError("the model has no LoRA adapters")
    for _, cell in _target_linears(model, config.targets):
        if cell.lora_a is None:
            continue
        delta = cell.lora_b.asnumpy().astype(np.float32) @ cell.lora_a.asnumpy().astype(np.float32)
        merged = cell.weight.asnumpy().astype(np.float32) + delta * np.float32(cell.lora_scale)
        cell.weight.set_data(ms.Tensor(merged).astype(cell.weight.dtype))
        cell.remove_lora()
    model.lora_config = None
    model.freeze_base(False)
    model.structure_changed()
    return model
