"""GLM3Config: the ChatGLM3 hyper-parameters, HuggingFace config.json round trip, and named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm3.dtypes import DTYPE_CHOICES, FLOAT_DTYPES
from glm3.quantization import CONFIG_KEY as QUANT_KEY
from glm3.quantization import QuantizationConfig

# Fields of the released HuggingFace config.json that only describe the PyTorch runtime. They are
# kept and written back so that a round trip through our format stays loadable by the official code.
_HF_RUNTIME_DEFAULTS: dict[str, Any] = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "bias_dropout_fusion": True,
    "classifier_dropout": None,
    "pre_seq_len": None,
    "prefix_projection": False,
    "quantization_bit": 0,
    "use_cache": True,
    "transformers_version": "4.30.2",
}


# What every `--dtype` option takes: "auto" is the checkpoint's own storage dtype (config.json torch_dtype).


class ConfigError(ValueError):
    """A configuration that does not describe a valid ChatGLM3 model."""


def resolve_dtype(dtype: str, config: GLM3Config) -> str:
    """The storage dtype a setting names: "auto" is the checkpoint's own (config.json torch_dtype), so a
    float16 or bfloat16 checkpoint stays in its dtype through every stage unless a setting says otherwise."""
    if dtype == "auto":
        return config.torch_dtype
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return dtype


def rope_inv_freq(rotary_dim: int, base: float) -> np.ndarray:
    """RoPE inverse frequencies theta_i = base^(-2i / rotary_dim), float32, computed step by step in float32
    as the reference does (so angles round the same way). HF checkpoints store them as `inv_freq`."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)


@dataclass
class GLM3Config:
    """Every architecture field of the released ChatGLM3-6B config.json (defaults = the 6B release)."""

    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    padded_vocab_size: int = 65024
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    apply_residual_connection_post_layernorm: bool = False
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    original_rope: bool = True
    # Kept for the round trip only: transformers' save_pretrained writes true for a ChatGLMConfig built without
    # the key, and the official modeling code ignores it (output_layer is never tied to the embedding).
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"
    eos_token_id: int = 2
    pad_token_id: int = 0
    rope_ratio: float = 1.0
    # Weight-only quantization of the checkpoint (glm3.quantization), config.json's `glm3_quantization`.
    quantization: QuantizationConfig | None = None
    # Unknown keys of a config.json, preserved verbatim for the round trip.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- derived
    @property
    def num_kv_groups(self) -> int:
        """Key/value heads: multi_query_group_num with grouped-query attention, else one per head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_kv_groups * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates: the first half (ChatGLM's partial rotary)."""
        return self.kv_channels // 2

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    # -------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "kv_channels",
            "multi_query_group_num",
            "padded_vocab_size",
            "seq_length",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.layernorm_epsilon > 0:
            raise ConfigError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")
        if not self.rope_ratio > 0:
            raise ConfigError(f"rope_ratio must be > 0, got {self.rope_ratio!r}")
        if self.multi_query_attention and self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"multi_query_group_num ({self.multi_query_group_num})"
            )
        if self.kv_channels % 4:
            raise ConfigError(
                f"kv_channels ({self.kv_channels}) must be a multiple of 4: RoPE rotates the first half of "
                "each head in pairs of channels"
            )
        if not self.rmsnorm:
            raise ConfigError(
                "rmsnorm=false (LayerNorm, as in ChatGLM2 variants) is not supported: ChatGLM3 uses RMSNorm"
            )
        if not self.original_rope:
            raise ConfigError("original_rope=false is not supported: ChatGLM3 uses the original (interleaved) RoPE")
        if self.torch_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"torch_dtype must be one of {FLOAT_DTYPES}, got {self.torch_dtype!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.padded_vocab_size:
                raise ConfigError(f"{name} must be an id in [0, padded_vocab_size), got {value!r}")

    # ------------------------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> GLM3Config:
        """Build from a HuggingFace config.json (a path to the file or its folder, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            data = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ConfigError(f"no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ConfigError(f"{path} must hold a JSON object")
        model_type = data.get("model_type", "chatglm")
        if model_type != "chatglm":
            raise ConfigError(f"model_type {model_type!r} is not a ChatGLM config (expected 'chatglm')")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "quantization"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if data.get(QUANT_KEY) is not None:
            try:
                kwargs["quantization"] = QuantizationConfig.from_dict(data[QUANT_KEY])
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        known = known | {QUANT_KEY}
        if kwargs.get("rope_ratio") is None:
            kwargs.pop("rope_ratio", None)
        # Older uploads store eos_token_id as a list; keep the first as the model's own eos.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict the HuggingFace ChatGLM3 code loads."""
        out: dict[str, Any] = dict(_HF_RUNTIME_DEFAULTS)
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "quantization")}
        )
        if self.quantization is not None:
            out[QUANT_KEY] = self.quantization.to_dict()
        out.update(self.extra)
        return out

    def save(self, directory: str | os.PathLike) -> str:
        """Write config.json (atomically) into directory and return its path."""
        from glm3.io import atomic_write_text

        path = os.path.join(os.fspath(directory), "config.json")
        atomic_write_text(path, json.dumps(self.to_hf(), indent=2, ensure_ascii=False) + "\n")
        return path

    def replace(self, **changes: Any) -> GLM3Config:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GLM3Config:
        """A named preset (see PRESETS), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The released THUDM/chatglm3-6b.
    "glm3_6b": {},
    # THUDM/chatglm3-6b-32k: same weights layout, RoPE base scaled by rope_ratio, longer context.
    "glm3_6b_32k": {"rope_ratio": 50.0, "seq_length": 32768},
    # Benchmark shape: the real vocabulary and head size, four layers.
    "bench": {
        "num_layers": 4,
        "hidden_size": 1024,
        "ffn_hidden_size": 2816,
        "num_attention_heads": 16,
        "kv_channels": 64,
        "multi_query_group_num": 2,
        "padded_vocab_size": 65024,
        "torch_dtype": "float32",
    },
    # Tests and the embedded default: a few MB, the tokenizer trained from the shipped corpus fits in its vocab.
    "tiny": {
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 160,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "multi_query_group_num": 2,
        "padded_vocab_size": 2048,
        "seq_length": 1024,
        "torch_dtype": "float32",
    },
}
