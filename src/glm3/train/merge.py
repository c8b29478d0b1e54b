"""From a training run's per-rank checkpoints (or a LoRA adapter) to one plain model directory, and back.

- Data-parallel runs hold the same weights on every rank: merging checks that all ranks agree, tensor by
  tensor, and takes rank 0's (a disagreement is an error, never averaged away).
- Sharded runs (tensor/pipeline parallel on Ascend) are merged by MindSpore's `transform_checkpoints` using
  the ranks' strategy files (several pipeline-stage files are first combined with `merge_pipeline_strategys`).
- `split_model` goes the other way: a full model into per-rank checkpoints for a given strategy file, to
  resume on another topology.
- LoRA adapters are folded into their base model (W + B·A·alpha/rank).
Every output tensor is checked against the config (name, shape, floating dtype) before anything is written,
and every output directory appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import shutil
import tempfile

import mindspore as ms
import numpy as np

from glm3.io import atomic_directory
from glm3.memory import check_memory, streaming_estimate
from glm3.modeling.config import GLM3Config, resolve_dtype
from glm3.modeling.tokenizer import copy_tokenizer_files
from glm3.train.checkpoint import STATE_FILE, list_checkpoints
from glm3.weights.checkpoint import is_training_state, iter_checkpoint
from glm3.weights.shards import DEFAULT_SHARD_SIZE, write_model_weights
from glm3.weights.tensor_files import ckpt_tensor_types, iter_ms_ckpt


class MergeError(ValueError):
    pass


@dataclasses.dataclass
class MergeSummary:
    dst: str
    ranks: int
    step: int | None
    method: str  # "data-parallel", "strategy", "single" or "lora"
    tensors: int

    def describe(self) -> str:
        where = f" (step {self.step})" if self.step is not None else ""
        return f"merged {self.ranks} rank(s){where} by {self.method}: {self.tensors} tensors -> {self.dst}"


def rank_checkpoints(run: str | os.PathLike, step: int | None = None) -> tuple[list[str], int | None]:
    """([rank 0's checkpoint file, rank 1's, ...], step) under a run directory, its checkpoint/ directory, or
    any directory of rank_N/ folders.

    A rank_N/ folder holds either training checkpoints (step_XXXXXXXX/state.ckpt; every rank must have the
    step, by default the newest one all ranks have) or plain .ckpt files (the last by name is used, as
    MindSpore's transform_checkpoints does)."""
    root = os.fspath(run)
    if os.path.isdir(os.path.join(root, "checkpoint")):
        root = os.path.join(root, "checkpoint")
    ranks = (
        sorted(
            (int(d[len("rank_") :]), os.path.join(root, d))
            for d in os.listdir(root)
            if d.startswith("rank_") and d[len("rank_") :].isdigit()
        )
        if os.path.isdir(root)
        else []
    )
    if not ranks:
        raise MergeError(f"no rank_N checkpoint directories in {root}")
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise MergeError(f"ranks {[r for r, _ in ranks]} in {root} are not 0..{len(ranks) - 1}: a rank is missing")
    steps = [dict(list_checkpoints(path)) for _, path in ranks]
    if not any(steps):
        files = [sorted(glob.glob(os.path.join(path, "*.ckpt"))) for _, path in ranks]
        empty = [r for r, found in enumerate(files) if not found]
        if empty:
            raise MergeError(f"rank(s) {empty} in {root} hold no checkpoint")
        return [found[-1] for found in files], None
    common = set(steps[0]).intersection(*steps[1:])
    if step is None:
        if not common:
            raise MergeError(f"the ranks in {root} have no checkpoint step in common")
        step = max(common)
    missing = [r for r, found in enumerate(steps) if step not in found]
    if missing:
        raise MergeError(f"rank(s) {missing} in {root} have no checkpoint of step {step}")
    return [os.path.join(found[step], STATE_FILE) for found in steps], step


def _model_stream(paths: list[str], where: str):
    """(name, array) of the model weights in rank 0's checkpoint, one tensor at a time, optimizer state
    skipped. With several ranks, every rank's tensor is compared with rank 0's as it streams by, so ranks
    must agree bit for bit (a data-parallel run) and memory stays at one tensor per rank."""
    streams = [iter_ms_ckpt(p, want=lambda name: not is_training_state(name)) for p in paths]
    for items in itertools.zip_longest(*streams):
        if any(item is None for item in items):
            raise MergeError(f"{where}: the ranks hold different numbers of tensors")
        name, array = items[0]
        for rank, (other_name, other) in enumerate(items[1:], 1):
            if other_name != name:
                raise MergeError(f"{where}: rank {rank} holds {other_name} where rank 0 holds {name}")
            if not np.array_equal(other, array):
                raise MergeError(
                    f"rank {rank} disagrees with rank 0 on {name}: not a data-parallel run (or its "
                    "ranks diverged); pass the strategy files to merge a sharded run"
                )
        yield name, array


def write_model_dir(
    tensors,
    config: GLM3Config,
    dst: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    where: str,
    overwrite: bool = False,
    dtype: str = "auto",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> int:
    """Write (name, array) pairs as a model directory (config.json, sharded weights + index [+ tokenizer]),
    tensor by tensor, each checked against the config. dtype "auto" is `config.torch_dtype`, the base's, so
    a half-precision base gives a half-precision result. Returns the tensor count."""
    dtype = resolve_dtype(dtype, config)
    count = [0]

    def counted():
        for item in tensors:
            count[0] += 1
            yield item

    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_model_weights(counted(), tmp, config, dtype, shard_size, where=where)
        config.replace(torch_dtype=dtype).save(tmp)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return count[0]


def _strategy_file(strategy: str, scratch: str) -> str:
    """A single strategy file: the given file, or the pipeline stages' files of a directory combined."""
    if os.path.isfile(strategy):
        return strategy
    files = sorted(glob.glob(os.path.join(strategy, "*.ckpt")))
    if not files:
        raise MergeError(f"no strategy files (*.ckpt) in {strategy}")
    if len(files) == 1:
        return files[0]
    merged = os.path.join(scratch, "merged_strategy.ckpt")
    ms.merge_pipeline_strategys(strategy, merged)
    return merged


def _check_rank_count(strategy_file: str, ranks: int) -> None:
    from glm3.train.strategy import read_strategy_file

    layouts = read_strategy_file(strategy_file)
    devices = int(np.prod(next(iter(layouts.values()))["dev_matrix"]))
    stages = 1 + max((int(k.split("-", 1)[0]) for k in layouts if "-" in k and k.split("-", 1)[0].isdigit()), default=0)
    if devices * stages != ranks:
        raise MergeError(
            f"the strategy describes {devices * stages} rank(s) ({devices} per stage, {stages} "
            f"stage(s)) but {ranks} rank checkpoint(s) were found"
        )


def merge_run(
    run: str | os.PathLike,
    dst: str | os.PathLike,
    base: str | os.PathLike,
    strategy: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> MergeSummary:
    """Merge a training run's per-rank checkpoints into a model directory.

    `base` is the model the run started from: its config and tokenizer are used, and for a LoRA run its
    weights (the run's checkpoints then hold only the adapters, which are folded in). The result is stored as
    `dtype` ("auto": the base's dtype, whatever precision the run trained in), in shards of `shard_size`.
    """
    config = GLM3Config.from_hf(base)
    paths, step = rank_checkpoints(run, step)
    where = os.fspath(run)
    check_memory(
        streaming_estimate(config, resolve_dtype(dtype, config), f"merging {where}", whole_model=bool(strategy))
    )
    with tempfile.TemporaryDirectory(prefix="glm3-merge-") as scratch:
        if strategy:
            src = os.path.join(scratch, "src")
            for rank, path in enumerate(paths):
                os.makedirs(os.path.join(src, f"rank_{rank}"))
                os.symlink(os.path.abspath(path), os.path.join(src, f"rank_{rank}", "state.ckpt"))
            strategy_file = _strategy_file(strategy, scratch)
            _check_rank_count(strategy_file, len(paths))
            try:
                ms.transform_checkpoints(src, os.path.join(scratch, "out"), "merged", strategy_file, None)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise MergeError(f"MindSpore could not merge {len(paths)} rank(s) with {strategy}: {exc}") from None
            sources, method = glob.glob(os.path.join(scratch, "out", "rank_0", "*.ckpt")), "strategy"
        else:
            sources, method = paths, "data-parallel" if len(paths) > 1 else "single"
        if any(n.endswith((".lora_a", ".lora_b")) and not is_training_state(n) for n in ckpt_tensor_types(sources[0])):
            adapter = os.path.join(where, "adapter")
            if not os.path.isdir(adapter):
                raise MergeError(f"{run} is a LoRA run but has no adapter/ directory with its adapter_config.json")
            state = dict(_model_stream(sources, where))  # the adapters only: a few MB
            summary = _fold(base, adapter, state, dst, overwrite, dtype, shard_size)
            return dataclasses.replace(summary, ranks=len(paths), step=step)
        count = write_model_dir(_model_stream(sources, where), config, dst, base, where, overwrite, dtype, shard_size)
    return MergeSummary(os.fspath(dst), len(paths), step, method, count)


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    dst: str | os.PathLike,
    overwrite: bool = False,
    dtype: str = "auto",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> MergeSummary:
    """Fold a saved LoRA adapter into its base model and write a plain model directory (see merge_run)."""
    return _fold(base, adapter, None, dst, overwrite, dtype, shard_size)


def _fold(base, adapter, state, dst, overwrite, dtype, shard_size) -> MergeSummary:
    """Stream the base model's tensors with the adapter folded in (W + B·A·alpha/rank in float32, stored back
    as `dtype`): memory is one base tensor at a time, never the model. `state` holds the adapter tensors of a
    run's checkpoint; None reads them from the adapter directory."""
    from glm3.train.lora import adapter_weights, check_adapter_base, fold_adapter, read_adapter_config

    base = os.fspath(base)
    config = GLM3Config.from_hf(base)
    if state is None:  # merge_run checked already
        check_memory(streaming_estimate(config, resolve_dtype(dtype, config), f"folding {adapter} into {base}"))
    lora, base_config = read_adapter_config(adapter)
    check_adapter_base(base_config, config, adapter)
    tensors = state if state is not None else adapter_weights(adapter)
    stream = ((name, array) for name, array, _ in iter_checkpoint(base, config, skip_training_state=True))
    folded = fold_adapter(stream, config, lora, tensors, where=os.fspath(adapter))
    count = write_model_dir(folded, config, dst, base, base, overwrite, dtype, shard_size)
    return MergeSummary(os.fspath(dst), 1, None, "lora", count)


def split_model(
    model_dir: str | os.PathLike, strategy_file: str, dst: str | os.PathLike, overwrite: bool = False
) -> list[str]:
    """Write `dst/rank_N/model.ckpt`, the shards of a model directory under a strategy file."""
    from glm3.weights.checkpoint import iter_checkpoint

    config = GLM3Config.from_hf(model_dir)
    tensors = {
        name: array for name, array, _ in iter_checkpoint(os.fspath(model_dir), config, skip_training_state=True)
    }
    with tempfile.TemporaryDirectory(prefix="glm3-split-") as scratch:
        os.makedirs(os.path.join(scratch, "rank_0"))
        ms.save_checkpoint(
            [{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()],
            os.path.join(scratch, "rank_0", "model.ckpt"),
        )
        del tensors
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            try:
                ms.transform_checkpoints(scratch, tmp, "model", None, strategy_file)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise MergeError(f"MindSpore could not split {model_dir} with {strategy_file}: {exc}") from None
            for rank_dir in glob.glob(os.path.join(tmp, "rank_*")):
                for name in os.listdir(rank_dir):
                    if name != "model.ckpt":
                        shutil.move(os.path.join(rank_dir, name), os.path.join(rank_dir, "model.ckpt"))
    return sorted(glob.glob(os.path.join(os.fspath(dst), "rank_*", "model.ckpt")))
