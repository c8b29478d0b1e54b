"""The settings of an export: the one definition behind `glm3 export`'s flags, params.yaml's `export` section
and glm3.deploy.export.export_model (and recorded in every export's export_config.json)."""

from __future__ import annotations

import dataclasses

from glm3.dtypes import DTYPE_CHOICES
from glm3.runtime.kv_cache_manager import CacheConfig
from glm3.settings import setting

WEIGHT_MODES = ("inputs", "embedded")


@dataclasses.dataclass(frozen=True)
class ExportSettings(CacheConfig):
    """num_blocks and block_size (CacheConfig's) shape a paged export's cache."""

    batch_size: int | None = setting(
        1, "static batch size; none (--dynamic-batch, or export.batch_size: null): a dynamic batch dimension"
    )
    prompt_length: int = setting(64, "prefill width: the longest prompt the export takes")
    seq_length: int | None = setting(None, "KV cache length (default: the model's seq_length)")
    paged: bool = setting(False, "a paged (block-table) KV cache instead of a static one")
    fused_paged_attention: bool = setting(
        False,
        "paged: use MindSpore's PagedAttention operator (float16; runs in MindSpore Lite on Ascend, not in MindSpore)",
    )
    weights: str = setting(
        "inputs",
        "inputs: the graphs take the weights as inputs and the weights are stored once beside them (hard-linked "
        "from the model when possible); embedded: MindSpore's self-contained graphs, each with its own copy (for "
        "MindSpore Lite)",
        choices=WEIGHT_MODES,
    )
    dtype: str = setting("auto", "weight dtype of the export; auto: the model's own", choices=DTYPE_CHOICES)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or none for a dynamic batch), got {self.batch_size}")
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.fused_paged_attention and not self.paged:
            raise ValueError("fused_paged_attention needs a paged export")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
