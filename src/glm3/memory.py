"""Will it fit? Memory estimates of the heavy stages from the config and settings, checked before any weight
is loaded, so a run that cannot fit fails in seconds with one message instead of minutes later in the
kernel's OOM killer.

The estimates are sums of named parts (weights in their storage dtype, optimizer state, activations, KV
cache, the runtime), each from the shapes; the activation and runtime coefficients were measured on this
project's model with MindSpore 2.10 on CPU (see README "At the real size"). `available_bytes()` is what the host can
give now: MemAvailable, or the cgroup's limit minus its usage when that is lower. GLM3_SKIP_MEMORY_CHECK=1
turns the check off (the estimate is still logged).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from glm3.dtypes import CAST_BLOCK_BYTES, ITEMSIZE
from glm3.modeling.config import GLM3Config
from glm3.weights.checkpoint import expected_dtypes, expected_shapes, float_shapes

log = logging.getLogger(__name__)

GB = 1e9
# MindSpore, its compiled graphs and Python: measured 0.4-0.5 GB before any weight; with the graphs of a
# 28-layer model a little more.
RUNTIME_BYTES = int(0.8 * GB)
# Activations MindSpore keeps per token and layer, in float32 values: in inference about 6 hidden-sized
# vectors (measured 25 MB per layer at 256 tokens of the 6B shape); in a training step forward and backward,
# about 28 hidden-sized plus 4 ffn-sized vectors (measured 0.67-0.77 MB per token per layer at the 6B shape).
_INFER_ACT = (6, 0)
_TRAIN_ACT = (28, 4)


class MemoryBudgetError(ValueError):
    """The host cannot hold what a stage would need."""


@dataclasses.dataclass
class MemoryEstimate:
    """What a stage needs, by part (bytes)."""

    what: str
    parts: dict[str, int]
    advice: str  # what to change when it does not fit

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = " + ".join(f"{name} {value / GB:.1f}" for name, value in self.parts.items() if value >= 0.05 * GB)
        return f"{self.what} needs about {self.total / GB:.1f} GB ({parts})"


def available_bytes() -> int:
    """Memory this process can still get: MemAvailable, or the cgroup limit minus usage if lower."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = int(limit) - usage
            available = room if available is None else min(available, room)
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The peak resident set of a process as the kernel counts it (VmHWM, 0 where /proc has none). Unlike
    ru_maxrss it is the process's own: a child started by fork and exec does not inherit its parent's peak."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def weight_bytes(config: GLM3Config, dtype: str) -> int:
    """Bytes of every weight of the model stored as `dtype` (a quantized model's data and scales as stored)."""
    exact = expected_dtypes(config)
    return sum(_numel(shape) * ITEMSIZE[exact.get(name, dtype)] for name, shape in expected_shapes(config).items())


def largest_weight_bytes(config: GLM3Config, dtype: str) -> int:
    return max(_numel(shape) for shape in float_shapes(config).values()) * ITEMSIZE[dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _activations(config: GLM3Config, tokens: int, coefficients: tuple[int, int]) -> int:
    hidden, ffn = coefficients
    per_token_layer = (hidden * config.hidden_size + ffn * config.ffn_hidden_size) * 4
    return tokens * config.num_layers * per_token_layer


def kv_cache_bytes(config: GLM3Config, batch: int, length: int) -> int:
    """A float32 key and value cache of `length` positions for `batch` rows, every layer."""
    return 2 * config.num_layers * batch * config.num_kv_groups * length * config.kv_channels * 4


def inference_estimate(
    config: GLM3Config,
    dtype: str,
    batch: int = 1,
    length: int | None = None,
    kernels: bool = True,
    what: str = "loading the model",
    cache_tokens: int | None = None,
) -> MemoryEstimate:
    """Weights as stored, a KV cache of `length` positions per row (default: a 2048-token conversation) or a
    paged one of `cache_tokens` slots shared by the rows, prefill activations, and without the CPU kernels the
    blocks a matmul casts to float32 (see glm3.dtypes.CAST_BLOCK_BYTES)."""
    length = min(config.seq_length, length or 2048)
    parts = {
        f"weights {dtype}": weight_bytes(config, dtype),
        "KV cache": kv_cache_bytes(config, batch, length)
        if cache_tokens is None
        else kv_cache_bytes(config, 1, cache_tokens),
        "activations": _activations(config, batch * min(length, 512), _INFER_ACT)
        + batch * config.padded_vocab_size * 4 * 4,
        "runtime": RUNTIME_BYTES,
    }
    if dtype != "float32" and not kernels:
        parts["float32 casts"] = largest_weight_bytes(config, dtype) + 2 * CAST_BLOCK_BYTES
    return MemoryEstimate(
        what,
        parts,
        "use a half-precision checkpoint (glm3 convert --dtype float16), or a shorter context / smaller batch",
    )


def streaming_estimate(config: GLM3Config, dtype: str, what: str, whole_model: bool = False) -> MemoryEstimate:
    """A stage that streams the weights one tensor at a time (merge, export with weights as graph inputs):
    the largest tensor as read and as written in `dtype`, its float32 working copy, and the runtime. With
    whole_model (a merge by strategy files: MindSpore's transform_checkpoints holds the ranks' slices and the
    merged model) the float32 model twice instead."""
    if whole_model:
        model = weight_bytes(config, "float32")
        parts = {"rank slices float32": model, "merged float32": model}
        advice = "merge on a host with more memory (the Ascend servers that trained it)"
    else:
        parts = {
            f"largest tensor {dtype} (read and written)": 2 * largest_weight_bytes(config, dtype),
            "its float32 working copy": largest_weight_bytes(config, "float32"),
        }
        advice = "free memory or use a larger host: this stage already holds one tensor at a time"
    parts["runtime"] = RUNTIME_BYTES
    return MemoryEstimate(what, parts, advice)


def finetune_estimate(
    config: GLM3Config,
    weights_dtype: str,
    lora_trainable: int | None,
    batch: int,
    seq_length: int,
    grad_accumulation: int = 1,
) -> MemoryEstimate:
    """A training step: the weights in `weights_dtype`; for full fine-tuning their float32 gradients and two
    Adam moments (plus accumulation buffers); for LoRA the adapters' (lora_trainable parameters, float32);
    the activations of one micro-batch; the logits and their gradient."""
    tokens = batch * seq_length
    parts = {f"weights {weights_dtype}": weight_bytes(config, weights_dtype)}
    if lora_trainable is None:
        trainable = sum(_numel(s) for s in float_shapes(config).values())
        parts["gradients"] = trainable * 4
        parts["optimizer state"] = 2 * trainable * 4
        if grad_accumulation > 1:
            parts["accumulated gradients"] = trainable * 4
    else:
        parts["adapters + optimizer"] = lora_trainable * 4 * 4
    parts["activations"] = _activations(config, tokens, _TRAIN_ACT) + 4 * tokens * config.padded_vocab_size * 4
    parts["runtime"] = RUNTIME_BYTES
    if lora_trainable is None:
        advice = (
            "use LoRA (finetune.lora.enabled: true / --lora), which trains adapters over the frozen base "
            "in its own half precision, or lower seq_length / batch_size"
        )
    else:
        advice = (
            "keep the base in half precision (convert.dtype: float16 / --dtype auto on a float16 "
            "checkpoint), or lower seq_length / batch_size"
        )
    return MemoryEstimate("fine-tuning", parts, advice)


def check_memory(estimate: MemoryEstimate, available: int | None = None) -> MemoryEstimate:
    """Raise MemoryBudgetError if the estimate exceeds what the host has; log it either way."""
    available = available_bytes() if available is None else available
    if estimate.total > available and os.environ.get("GLM3_SKIP_MEMORY_CHECK") != "1":
        raise MemoryBudgetError(
            f"{estimate.describe()}, but this host has {available / GB:.1f} GB available: "
            f"{estimate.advice} (GLM3_SKIP_MEMORY_CHECK=1 skips this check)"
        )
    log.info("%s; %.1f GB available", estimate.describe(), available / GB)
    return estimate
