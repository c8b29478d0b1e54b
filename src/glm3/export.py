"""MindIR export of a model directory: a prefill graph and a one-token decode graph, plus what a runner needs.

The KV cache is explicit graph data, not state hidden in the graphs: prefill returns it (one key and one
value tensor per layer, [batch, kv_groups, seq_length, head_dim]) and decode takes it as an input and returns
it updated, so the two graphs are pure functions and any runtime can hold the cache where it likes.

Shapes: prompts are left-padded to `prompt_length`; the cache holds `seq_length` positions. The batch is
static (`batch_size`) or dynamic (`batch_size=None`: any batch at run time).

With `paged=True` the cache is a block cache instead (glm3.kv_cache): per layer [num_blocks, block_size,
kv_groups, head_dim] keys and values shared by the batch; prefill also takes the prompt's slot mapping, and
decode takes each row's slot, block table ([batch, ceil(seq_length / block_size)]) and context length.

Output directory: prefill.mindir, decode.mindir, export_config.json, config.json and the tokenizer files.
"""
from __future__ import annotations

import dataclasses
import json
import os

import mindspore as ms
from mindspore import Tensor

from glm3.io import atomic_directory
from glm3.tokenizer import copy_tokenizer_files

EXPORT_CONFIG = "export_config.json"
PREFILL, DECODE = "prefill.mindir", "decode.mindir"


class ExportError(ValueError):
    pass


@dataclasses.dataclass
class ExportConfig:
    batch_size: int | None  # None: dynamic batch dimension
    prompt_length: int
    seq_length: int
    num_layers: int
    kv_groups: int
    head_dim: int
    vocab_size: int
    pad_token_id: int
    stop_token_ids: list[int]
    paged: bool = False
    fused_paged_attention: bool = False
    block_size: int = 16
    num_blocks: int = 224
    kv_cache: str = "graph inputs/outputs: prefill returns 2*num_layers tensors [batch, kv_groups, seq_length, " \
                    "head_dim] (keys and values per layer); decode takes them and returns them updated"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ExportConfig":
        path = os.path.join(os.fspath(directory), EXPORT_CONFIG)
        if not os.path.isfile(path):
            raise ExportError(f"{directory} is not an exported model (no {EXPORT_CONFIG})")
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


    @property
    def max_blocks(self) -> int:
        return -(-self.seq_length // self.block_size)


def export_model(model_dir: str | os.PathLike, dst: str | os.PathLike, batch_size: int | None = 1,
                 prompt_length: int = 64, seq_length: int | None = None, paged: bool = False,
                 block_size: int = 16, num_blocks: int = 224, fused_paged_attention: bool = False,
                 overwrite: bool = False) -> str:
    """Export `model_dir` to `dst` (see the module docstring). seq_length defaults to the model's.

    fused_paged_attention: the decode graph uses MindSpore's PagedAttention operator (float16), for MindSpore
    Lite on Ascend; MindSpore itself cannot run that graph, so it is for deployment, not for `glm3 infer` here.
    """
    from glm3.kv_cache import DecodeStep, PagedDecodeStep, PagedPrefillStep, PrefillStep
    from glm3.loading import load_model

    model = load_model(model_dir, kernels_backend="plain")
    config = model.config
    seq_length = seq_length or config.seq_length
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"batch_size must be >= 1 (or None for a dynamic batch), got {batch_size}")
    if not 1 <= prompt_length < seq_length <= config.seq_length:
        raise ExportError(f"need 1 <= prompt_length ({prompt_length}) < seq_length ({seq_length}) <= the model's "
                          f"seq_length ({config.seq_length})")
    spec = ExportConfig(batch_size, prompt_length, seq_length, config.num_layers, config.num_kv_groups,
                        config.kv_channels, config.padded_vocab_size, config.pad_token_id,
                        sorted({config.eos_token_id, *model.stop_token_ids}), paged, fused_paged_attention,
                        block_size, num_blocks)
    if fused_paged_attention and not paged:
        raise ExportError("fused_paged_attention needs a paged export")
    for layer in model.transformer.encoder.layers:
        layer.self_attention.fused_paged = fused_paged_attention
    if paged and (block_size < 1 or num_blocks < 2):
        raise ExportError(f"a paged cache needs block_size >= 1 and num_blocks >= 2, got {block_size}, {num_blocks}")
    b = batch_size  # None becomes a dynamic dimension
    ids, prompt = Tensor(shape=[b, 1], dtype=ms.int32), Tensor(shape=[b, prompt_length], dtype=ms.int32)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        prefill_file, decode_file = os.path.join(tmp, "prefill"), os.path.join(tmp, "decode")
        if paged:
            cache = Tensor(shape=[num_blocks, block_size, spec.kv_groups, spec.head_dim], dtype=ms.float32)
            caches = ms.mutable((cache,) * (2 * spec.num_layers))
            ms.export(PagedPrefillStep(model), prompt, prompt, prompt, caches, file_name=prefill_file,
                      file_format="MINDIR")
            row = Tensor(shape=[b], dtype=ms.int32)
            ms.export(PagedDecodeStep(model), ids, ids, row, Tensor(shape=[b, spec.max_blocks], dtype=ms.int32), row,
                      caches, file_name=decode_file, file_format="MINDIR")
        else:
            cache = Tensor(shape=[b, spec.kv_groups, seq_length, spec.head_dim], dtype=ms.float32)
            ms.export(PrefillStep(model, seq_length), prompt, prompt, file_name=prefill_file, file_format="MINDIR")
            ms.export(DecodeStep(model, seq_length), ids, ids, Tensor(shape=[b, seq_length], dtype=ms.bool_),
                      Tensor(0, ms.int32), ms.mutable((cache,) * (2 * spec.num_layers)), file_name=decode_file,
                      file_format="MINDIR")
        with open(os.path.join(tmp, EXPORT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(spec), f, indent=2)
        config.save(tmp)
        copy_tokenizer_files(model_dir, tmp)
    return os.fspath(dst)
