"""The settings of a fine-tuning run: FinetuneConfig and the LoRA adapters' LoraConfig.

Plain dataclasses with no framework behind them, so params.yaml, the command line and the launcher can build
and check a run's settings in milliseconds, before MindSpore is imported or anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from glm3.dtypes import DTYPE_CHOICES, FLOAT_DTYPES
from glm3.settings import setting
from glm3.train.parallel import ParallelConfig

LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class LoraError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = setting(8, "rank r of the adapters A [r, in] and B [out, r]")
    alpha: float = setting(32.0, "scale numerator: the update is B·A·alpha/r")
    dropout: float = setting(0.1, "dropout on the adapters' input while training")
    targets: tuple[str, ...] = setting(
        ("query_key_value",), "the Linear layers that get adapters, among " + ", ".join(LORA_TARGETS)
    )

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise LoraError(
                f"LoRA targets must be a non-empty subset of {', '.join(LORA_TARGETS)}; got {list(self.targets)}"
            )


@dataclasses.dataclass
class FinetuneConfig:
    model: str = setting(help="base model directory (ours or HuggingFace layout)")
    data: str = setting(help="ADGEN training file (JSON lines or a JSON array)")
    output: str = setting(help="run directory")
    tokenizer: str | None = setting(None, "tokenizer directory (default: the model's)")
    cache_dir: str | None = setting(None, "MindRecord cache of the tokenized data (default OUTPUT/data_cache)")
    seq_length: int = setting(193, "example length: must be max_source_length + max_target_length + 1")
    max_source_length: int = setting(64, "prompt tokens kept per example")
    max_target_length: int = setting(128, "answer tokens kept per example")
    preprocess: str = setting("mindformers_v3", "tokenization of the records", choices=("mindformers_v3", "chat"))
    ignore_pad_token_for_loss: bool = setting(True, "padding labels take no part in the loss")
    skip_bad_lines: bool = setting(False, "skip (and count) malformed data lines instead of stopping")
    batch_size: int = setting(1, "examples per rank and micro-step")
    grad_accumulation: int = setting(1, "micro-steps per optimizer step (token-weighted)")
    steps: int = setting(0, "optimizer steps; 0: as many as `epochs` takes")
    epochs: float = setting(1.0, "passes over the data, when steps is 0")
    lr: float = setting(1e-4, "peak learning rate")
    min_lr: float = setting(0.0, "learning rate the decay ends at")
    warmup_steps: int = setting(0, "steps of linear warmup (at most `steps`)")
    lr_schedule: str = setting("cosine", "decay after the warmup", choices=("cosine", "linear", "constant"))
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay (matrices only)")
    adam_beta1: float = setting(0.9, "Adam's first-moment decay")
    adam_beta2: float = setting(0.95, "Adam's second-moment decay")
    adam_eps: float = setting(1e-8, "Adam's epsilon")
    max_grad_norm: float = setting(1.0, "global gradient-norm clipping")
    seed: int = setting(42, "seed of the initialisation, data order and dropout")
    shuffle: bool = setting(True, "shuffle the data every epoch")
    dtype: str = setting(
        "auto",
        "storage of the weights while training; auto: LoRA keeps the base in the "
        "checkpoint's dtype, full fine-tuning trains float32 master weights (model/ is written in "
        "the checkpoint's dtype either way)",
        choices=DTYPE_CHOICES,
    )
    compute_dtype: str = setting(
        "float32",
        "matmul precision; float16/bfloat16 (Ascend) add dynamic loss scaling",
        choices=FLOAT_DTYPES,
    )
    loss_scale: float = setting(2.0**16, "initial dynamic loss scale (half-precision compute only)")
    loss_scale_window: int = setting(1000, "clean steps before the loss scale doubles")
    lora: LoraConfig | None = setting(None, "LoRA adapters only (None: full fine-tuning)", cli=False)
    save_every: int = setting(0, "steps between resumable checkpoints; 0: only at the end")
    keep_checkpoints: int = setting(2, "newest checkpoints kept")
    resume: str = setting("auto", "auto (the newest checkpoint in OUTPUT), never, or a checkpoint directory")
    parallel: ParallelConfig = setting(help="data/model/pipeline parallel layout", factory=ParallelConfig, cli=False)
    device: str = setting("CPU", "CPU, Ascend or GPU")
    progress: bool = setting(True, "show a progress bar", cli=False)
    stop_after: int | None = setting(
        None, "stop (with a checkpoint) after this step, as an interruption would", cli=False
    )
    timing_file: str | None = setting(
        None,
        "where the per-step seconds and tokens/s go (default "
        "OUTPUT/timing.json; kept out of the results, which are the same for the same "
        "inputs)",
    )

    def __post_init__(self):
        # YAML reads 1e-4 as a string (it wants 1.0e-4): accept numbers written either way.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("float", "int") and isinstance(value, str):
                try:
                    setattr(self, field.name, float(value) if field.type == "float" else int(value))
                except ValueError:
                    raise ValueError(f"finetune.{field.name} must be a number, got {value!r}") from None
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraConfig, self.lora, "finetune.lora")
        if isinstance(self.parallel, dict):
            self.parallel = from_dict(ParallelConfig, self.parallel, "finetune.parallel")

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        return from_dict(cls, values, "finetune")

    def validate(self) -> None:
        positive = ("batch_size", "grad_accumulation", "seq_length", "max_source_length", "max_target_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        total = self.max_source_length + self.max_target_length + 1
        if self.seq_length != total:
            raise ValueError(
                f"seq_length ({self.seq_length}) must equal max_source_length + max_target_length + 1 "
                f"= {self.max_source_length} + {self.max_target_length} + 1 = {total}: every example is "
                f"padded to exactly that length, as in MindFormers' recipe; set seq_length to {total} "
                "or change the two lengths"
            )
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise ValueError(f"give steps >= 1 or epochs > 0 (steps={self.steps}, epochs={self.epochs})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or (self.steps and self.warmup_steps > self.steps):
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.resume not in ("auto", "never") and not os.path.isdir(self.resume):
            raise ValueError(f"resume must be 'auto', 'never' or a checkpoint directory; {self.resume!r} is none")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.device.upper() == "CPU" and self.compute_dtype == "bfloat16":
            raise ValueError("bfloat16 compute is not supported on CPU; use float32 (or float16, slowly)")
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"training data {self.data} does not exist")
        self.parallel.validate(self.device)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed (not output paths, progress or stop points).

        The model, data and tokenizer count by what they hold, not where they are, so the same run in another
        clone of the project has the same fingerprint and writes the same checkpoints."""
        keep = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k
            not in (
                "output",
                "cache_dir",
                "progress",
                "resume",
                "stop_after",
                "save_every",
                "timing_file",
                "keep_checkpoints",
            )
        }
        for key in ("model", "data", "tokenizer"):
            keep[key] = content_identity(keep[key]) if keep[key] else None
        if keep["parallel"].get("rank_table_file"):
            keep["parallel"]["rank_table_file"] = content_identity(keep["parallel"]["rank_table_file"])
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def content_identity(path: str) -> str:
    """A digest of what a file or model directory holds: a file's bytes; a directory's config.json and
    tokenizer bytes plus the names and sizes of its other files (a 12.5 GB checkpoint is not read)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        digest.update(name.encode() + b"\0")
        if name.endswith((".json", ".model")):
            with open(full, "rb") as f:
                digest.update(f.read())
        else:
            digest.update(str(os.path.getsize(full)).encode())
    return digest.hexdigest()


def from_dict(cls, values: dict, where: str):
    """cls(**values), with unknown keys reported as a ValueError naming them (not a TypeError)."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {where} setting(s) {unknown}")
    return cls(**values)
