"""MindIR export of a model directory: a prefill graph and a one-token decode graph, plus what a runner needs.

The KV cache is explicit graph data, not state hidden in the graphs: prefill returns it (one key and one
value tensor per layer, [batch, kv_groups, seq_length, head_dim]) and decode takes it as an input and returns
it updated, so the two graphs are pure functions and any runtime can hold the cache where it likes.

Shapes: prompts are left-padded to `prompt_length`; the cache holds `seq_length` positions. The batch is
static (`batch_size`) or dynamic (`batch_size=None`: any batch at run time).

With `paged=True` the cache is a block cache instead (glm3.runtime.model_runner): per layer [num_blocks, block_size,
kv_groups, head_dim] keys and values shared by the batch; prefill also takes the prompt's slot mapping, and
decode takes each row's slot, block table ([batch, ceil(seq_length / block_size)]) and context length.

Weights (`weights=`):
- "inputs" (default): the graphs take the weights as extra inputs, after their own, in the order
  export_config.json lists (`weight_names`), and the weights are stored once beside them as the model's own
  sharded checkpoint in its dtype (hard-linked from the source when it already is one). Both graphs share
  that one copy at run time, and a 6B export needs no more memory than the 12.5 GB of float16 weights.
- "embedded": MindSpore's self-contained MindIR, the weights inside each graph (what MindSpore Lite on
  Ascend loads as is). Above 1 GiB MindSpore writes `<graph>_graph.mindir` plus `<graph>_variables/data_0`
  (external weight data, the protobuf limit is 2 GB); each graph carries its own copy, so the weights are on
  disk twice, and MindSpore's loader reads each data file whole before copying it into tensors (2.2x the
  weights per graph, measured), so a 6B embedded export cannot be loaded on a 24 GiB host.

Output directory: prefill/decode graphs, export_config.json, config.json, the tokenizer files and (weights
"inputs") the weight shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import mindspore as ms
from mindspore import Tensor

from glm3.deploy.settings import ExportSettings
from glm3.io import atomic_directory, public_permissions
from glm3.modeling.config import GLM3Config, resolve_dtype
from glm3.modeling.tokenizer import copy_tokenizer_files
from glm3.runtime.kv_cache_manager import CacheConfig
from glm3.runtime.model_runner import CacheGeometry
from glm3.weights.checkpoint import detect_layout, iter_checkpoint
from glm3.weights.shards import write_model_weights

EXPORT_CONFIG = "export_config.json"
PREFILL, DECODE = "prefill", "decode"  # graph names: <name>.mindir, or <name>_graph.mindir + <name>_variables/


class ExportError(ValueError):
    pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig(ExportSettings):
    """export_config.json: the settings an export was made with (seq_length and dtype resolved) and what a
    runner needs besides."""

    seq_length: int
    num_layers: int
    kv_groups: int
    head_dim: int
    vocab_size: int
    pad_token_id: int
    stop_token_ids: list[int]
    weight_names: list[str] = dataclasses.field(default_factory=list)  # the graphs' weight inputs, in order
    kv_cache: str = (
        "graph inputs/outputs: prefill returns 2*num_layers tensors [batch, kv_groups, seq_length, "
        "head_dim] (keys and values per layer); decode takes them and returns them updated"
    )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExportConfig:
        path = os.path.join(os.fspath(directory), EXPORT_CONFIG)
        if not os.path.isfile(path):
            raise ExportError(f"{directory} is not an exported model (no {EXPORT_CONFIG})")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            known = {f.name for f in dataclasses.fields(cls)}
            # Exports written before weights could be inputs embed them, and stored float32.
            values = {"weights": "embedded", "dtype": "float32", **values}
            config = cls(**{k: v for k, v in values.items() if k in known})
        except (OSError, ValueError, TypeError) as exc:
            raise ExportError(f"{path} is not a valid export config: {exc}") from None
        return config

    @property
    def max_blocks(self) -> int:
        return -(-self.seq_length // self.block_size)

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.num_blocks, self.block_size)

    @property
    def geometry(self) -> CacheGeometry:
        """The tensors of a paged export's cache."""
        return CacheGeometry(self.num_layers, self.kv_groups, self.head_dim, self.cache_config)


def graph_file(directory: str | os.PathLike, name: str) -> str:
    """The MindIR file of graph `name` in an export: `<name>.mindir`, or `<name>_graph.mindir` when MindSpore
    wrote the weights as external data."""
    for candidate in (f"{name}.mindir", f"{name}_graph.mindir"):
        path = os.path.join(os.fspath(directory), candidate)
        if os.path.isfile(path):
            return path
    raise ExportError(f"{directory} has no {name}.mindir (or {name}_graph.mindir)")


def _export_hook(weight_names: list[str] | None):
    """An export hook (ms.export's custom_func), run on each graph's protobuf before it is written.

    - It makes the file a function of the model and the settings only: MindSpore names the compile phase after
      the export's clock and object ids ("export.mindir.<time>.<id>.0") and lists primitives in hash order, so
      two exports of the same model differed and every `dvc repro` changed the export's hash. The attribute
      is informative (fixed here) and the primitives are sorted. A node bound to several Python names (a
      cell's result and its caller's variable) is named after all of them in an order that changes from run
      to run ("CNode_628$y$h" / "CNode_628$h$y"): the names are sorted (_canonical_names).
    - With `weight_names` (weights "inputs"), it turns the graph's parameters into trailing graph inputs,
      recording their names in order, so the MindIR file holds no weight data at all.
    """

    def hook(model_proto) -> None:
        graph = model_proto.graph
        for attribute in graph.attribute:
            if attribute.name == "compile_phase":
                attribute.s = b"export.mindir"
        # MindSpore lists the primitives in hash-table order, which changes between processes; nodes refer to
        # them by name, so sorting by name gives one file for one graph.
        primitives = sorted(model_proto.primitives, key=lambda p: p.name)
        del model_proto.primitives[:]
        model_proto.primitives.extend(primitives)
        _canonical_names(model_proto)
        if weight_names is None:
            return
        found = []
        for param in graph.parameter:
            value = graph.input.add()
            value.name = param.name
            tensor = value.tensor.add()
            tensor.dims.extend(param.dims)
            tensor.data_type = param.data_type
            tensor.name = param.name
            found.append(param.name.split(":", 1)[-1])
        del graph.parameter[:]
        if weight_names and weight_names != found:
            raise ExportError("the prefill and decode graphs take their weights in different orders")
        weight_names[:] = found

    return hook


def _canonical_name(name: str) -> str:
    """`name` with the variable names of each part ("CNode_628$y$h" after "CNode_628") in sorted order."""
    if "$" not in name:
        return name
    parts = []
    for part in name.split(":"):
        head, *variables = part.split("$")
        parts.append("$".join([head, *sorted(variables)]))
    return ":".join(parts)


def _canonical_names(message) -> None:
    """Every string field of a protobuf message and of the messages in it through _canonical_name (node names
    and the references to them alike; bytes, such as tensor data, untouched)."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                value[:] = [_canonical_name(v) for v in value]
            else:
                setattr(message, field.name, _canonical_name(value))
        elif field.type == field.TYPE_MESSAGE:
            for item in value if field.is_repeated else (value,):
                _canonical_names(item)


def _store_weights(model_dir: str, dst: str, config: GLM3Config, dtype: str) -> str:
    """The weights of `model_dir` as sharded checkpoint files in `dst`, in `dtype`: hard links when the source
    is already our layout in that dtype (after every tensor is checked against the config), else streamed
    and converted tensor by tensor. Returns "linked" or "written"."""
    kind, files, _ = detect_layout(model_dir)
    ours = kind == "ms_ckpt" and all(os.path.basename(f).startswith("mindspore_model") for f in files)
    if ours and config.torch_dtype == dtype:
        for _ in iter_checkpoint(model_dir, config):  # validate names, shapes, dtypes and the index
            pass
        names = [os.path.basename(f) for f in files] + [n for n in os.listdir(model_dir) if n.endswith(".index.json")]
        for name in names:
            try:
                os.link(os.path.join(model_dir, name), os.path.join(dst, name))
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(os.path.join(model_dir, name), os.path.join(dst, name))
        return "linked"
    tensors = ((name, array) for name, array, _ in iter_checkpoint(model_dir, config, skip_training_state=True))
    write_model_weights(tensors, dst, config, dtype, where=model_dir)
    return "written"


def export_model(
    model_dir: str | os.PathLike,
    dst: str | os.PathLike,
    settings: ExportSettings | None = None,
    *,
    overwrite: bool = False,
    **fields,
) -> str:
    """Export `model_dir` to `dst` (see the module docstring) with `settings`, or ExportSettings(**fields).
    seq_length defaults to the model's; dtype "auto" keeps the checkpoint's own (a float16 model exports
    float16 weights).

    fused_paged_attention: the decode graph uses MindSpore's PagedAttention operator (float16), for MindSpore
    Lite on Ascend; MindSpore itself cannot run that graph, so it is for deployment, not for `glm3 infer` here.
    """
    from glm3.memory import check_memory, inference_estimate, streaming_estimate
    from glm3.modeling.model import GLM3ForCausalLM
    from glm3.runtime.steps import DecodeStep, PagedDecodeStep, PagedPrefillStep, PrefillStep
    from glm3.weights.loading import load_model

    model_dir = os.fspath(model_dir)
    try:
        settings = dataclasses.replace(settings, **fields) if settings else ExportSettings(**fields)
    except (TypeError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    config = GLM3Config.from_hf(model_dir)
    dtype = resolve_dtype(settings.dtype, config)
    seq_length = settings.seq_length or config.seq_length
    batch_size, prompt_length, paged = settings.batch_size, settings.prompt_length, settings.paged
    if not prompt_length < seq_length <= config.seq_length:
        raise ExportError(
            f"need 1 <= prompt_length ({prompt_length}) < seq_length ({seq_length}) <= the model's "
            f"seq_length ({config.seq_length})"
        )
    weights = settings.weights
    if weights == "embedded":
        check_memory(inference_estimate(config, dtype, what="an embedded export (the weights in memory)"))
        model = load_model(model_dir, dtype=dtype, kernels_backend="plain")
    else:  # the graphs need the weights' shapes and dtypes only: nothing is loaded, the weights are streamed
        check_memory(streaming_estimate(config, dtype, f"exporting {model_dir}"))
        model = GLM3ForCausalLM(config, dtype=dtype, kernels_backend="plain", param_init="lazy")
        if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
            from glm3.modeling.tokenizer import ChatGLM3Tokenizer

            model.stop_token_ids = ChatGLM3Tokenizer.from_pretrained(model_dir).stop_token_ids[1:]
    spec = ExportConfig(
        **{**dataclasses.asdict(settings), "seq_length": seq_length, "dtype": dtype},
        num_layers=config.num_layers,
        kv_groups=config.num_kv_groups,
        head_dim=config.kv_channels,
        vocab_size=config.padded_vocab_size,
        pad_token_id=config.pad_token_id,
        stop_token_ids=sorted(model.end_token_ids),
    )
    num_blocks, block_size = spec.num_blocks, spec.block_size
    options = {"file_format": "MINDIR", "custom_func": _export_hook(spec.weight_names if weights == "inputs" else None)}
    b = batch_size  # None becomes a dynamic dimension
    ids, prompt = Tensor(shape=[b, 1], dtype=ms.int32), Tensor(shape=[b, prompt_length], dtype=ms.int32)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        prefill_file, decode_file = os.path.join(tmp, PREFILL), os.path.join(tmp, DECODE)
        if paged:
            cache = Tensor(shape=[num_blocks, block_size, spec.kv_groups, spec.head_dim], dtype=ms.float32)
            caches = ms.mutable((cache,) * (2 * spec.num_layers))
            ms.export(PagedPrefillStep(model), prompt, prompt, prompt, caches, file_name=prefill_file, **options)
            row = Tensor(shape=[b], dtype=ms.int32)
            tables = Tensor(shape=[b, spec.max_blocks], dtype=ms.int32)
            ms.export(
                PagedDecodeStep(model, spec.fused_paged_attention),
                ids,
                ids,
                row,
                tables,
                row,
                caches,
                file_name=decode_file,
                **options,
            )
        else:
            cache = Tensor(shape=[b, spec.kv_groups, seq_length, spec.head_dim], dtype=ms.float32)
            ms.export(PrefillStep(model, seq_length), prompt, prompt, file_name=prefill_file, **options)
            ms.export(
                DecodeStep(model, seq_length),
                ids,
                ids,
                Tensor(shape=[b, seq_length], dtype=ms.bool_),
                Tensor(0, ms.int32),
                ms.mutable((cache,) * (2 * spec.num_layers)),
                file_name=decode_file,
                **options,
            )
        for dirpath, dirnames, names in os.walk(tmp):  # MindSpore writes its graphs readable by their owner only
            for name in dirnames + names:
                public_permissions(os.path.join(dirpath, name))
        if weights == "inputs":
            _store_weights(model_dir, tmp, config, dtype)
        with open(os.path.join(tmp, EXPORT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(spec), f, indent=2)
        config.replace(torch_dtype=dtype).save(tmp)
        copy_tokenizer_files(model_dir, tmp)
    return os.fspath(dst)
