"""Parallel strategy files: what MindSpore's semi-auto parallel writes per rank (`strategy_ckpt_save_file`),
read and written here so checkpoints can be split and merged without an Ascend cluster.

A strategy file is a `ParallelStrategyMap` protobuf. For each parameter it stores a device matrix and a
tensor map: tensor_map[i] = k means tensor dimension i is split over device-matrix axis k, counted from the
right (so with dev_matrix [dp, mp], k = 0 is mp), and -1 means not split.
"""

from __future__ import annotations

import os

from glm3.io import atomic_write_bytes
from glm3.modeling.config import GLM3Config
from glm3.train.parallel import COLUMN_PARALLEL, ROW_PARALLEL


class StrategyError(ValueError):
    pass


def tensor_parallel_layout(config: GLM3Config) -> dict[str, list[int]]:
    """{parameter name: tensor map} of the Megatron layout `parallel.apply_shard_strategies` asks for:
    column-parallel weights (and their biases) split on the output dimension, row-parallel ones on the input
    dimension, the embedding table on the vocabulary; everything else (norms, row-parallel biases) replicated."""
    from glm3.weights.checkpoint import float_shapes as expected_shapes

    layout = {}
    for name, shape in expected_shapes(config).items():
        parts = name.split(".")
        owner, kind = parts[-2], parts[-1]
        if name == "transformer.embedding.embedding_table" or (owner in COLUMN_PARALLEL):
            layout[name] = [0] + [-1] * (len(shape) - 1)
        elif owner in ROW_PARALLEL and kind == "weight":
            layout[name] = [-1, 0]
        else:
            layout[name] = [-1] * len(shape)
    return layout


def write_strategy_file(
    path: str | os.PathLike, layout: dict[str, list[int]], dev_matrix: list[int], stage: int = 0
) -> str:
    """Write a strategy file for parameters laid out by `layout` over `dev_matrix` (atomically)."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    strategy = ParallelStrategyMap()
    strategy.current_stage = stage
    for name, tensor_map in layout.items():
        if any(k >= len(dev_matrix) for k in tensor_map):
            raise StrategyError(f"{name}: tensor map {tensor_map} names an axis outside dev_matrix {dev_matrix}")
        # The operator strategy of the parameter (split factor per dimension); it also carries the stage,
        # which MindSpore's merge_pipeline_strategys reads.
        op = strategy.parallel_strategy_item.add()
        op.node_name = name
        op.parallel_strategys.stage = stage
        op.parallel_strategys.parallel_strategy.add().dim.extend(
            [dev_matrix[len(dev_matrix) - 1 - k] if k >= 0 else 1 for k in tensor_map]
        )
        item = strategy.parallel_layout_item.add()
        item.param_name = name
        layouts = item.parallel_layouts
        layouts.dev_matrix.add().dim.extend(dev_matrix)
        layouts.tensor_map.add().dim.extend(tensor_map)
        layouts.param_split_shape.add()  # empty: even splits
        layouts.indices_offset.add()
        layouts.field = 0
        layouts.opt_weight_shard_step = 0
        layouts.opt_weight_shard_size = 0
    atomic_write_bytes(path, strategy.SerializeToString())
    return os.fspath(path)


def _checked_layout(config: GLM3Config, model_parallel: int, data_parallel: int) -> dict[str, list[int]]:
    """The tensor-parallel layout, after checking that every split dimension divides by model_parallel."""
    from glm3.weights.checkpoint import float_shapes as expected_shapes

    if model_parallel < 1 or data_parallel < 1:
        raise StrategyError("model_parallel and data_parallel must be >= 1")
    layout, shapes = tensor_parallel_layout(config), expected_shapes(config)
    for name, tensor_map in layout.items():
        for dim, axis in enumerate(tensor_map):
            if axis == 0 and shapes[name][dim] % model_parallel:
                raise StrategyError(
                    f"{name} dimension {dim} ({shapes[name][dim]}) does not split into {model_parallel}"
                )
    return layout


def write_tensor_parallel_strategy(
    path: str | os.PathLike, config: GLM3Config, model_parallel: int, data_parallel: int = 1
) -> str:
    """The strategy file a dp x mp run of this model writes (dev_matrix [dp, mp])."""
    layout = _checked_layout(config, model_parallel, data_parallel)
    return write_strategy_file(path, layout, [data_parallel, model_parallel])


def stage_of(name: str, num_layers: int, stages: int) -> int:
    """The pipeline stage holding a parameter, as parallel.apply_shard_strategies assigns them: layers split
    evenly in order, the embedding on the first stage, the final norm and output layer on the last."""
    if ".layers." in name:
        return int(name.split(".layers.", 1)[1].split(".", 1)[0]) // (num_layers // stages)
    return 0 if "embedding" in name else stages - 1


def write_pipeline_strategies(
    directory: str | os.PathLike,
    config: GLM3Config,
    pipeline_stages: int,
    model_parallel: int = 1,
    data_parallel: int = 1,
) -> list[str]:
    """One strategy file per pipeline stage (`stage_N.ckpt`), each in the tensor-parallel layout."""
    if pipeline_stages < 1 or config.num_layers % pipeline_stages:
        raise StrategyError(f"{config.num_layers} layers do not split evenly into {pipeline_stages} stages")
    layout = _checked_layout(config, model_parallel, data_parallel)
    paths = []
    for stage in range(pipeline_stages):
        part = {k: v for k, v in layout.items() if stage_of(k, config.num_layers, pipeline_stages) == stage}
        paths.append(
            write_strategy_file(
                os.path.join(os.fspath(directory), f"stage_{stage}.ckpt"),
                part,
                [data_parallel, model_parallel],
                stage=stage,
            )
        )
    return paths


def read_strategy_file(path: str | os.PathLike) -> dict[str, dict]:
    """{parameter name: {"dev_matrix": [...], "tensor_map": [...]}} of a strategy file."""
    from google.protobuf.message import DecodeError
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    strategy = ParallelStrategyMap()
    try:
        with open(path, "rb") as f:
            strategy.ParseFromString(f.read())
    except (OSError, DecodeError) as exc:
        raise StrategyError(f"cannot read strategy file {path}: {exc}") from None
    out = {}
    for item in strategy.parallel_layout_item:
        layouts = item.parallel_layouts
        out[item.param_name] = {
            "dev_matrix": [list(d.dim) for d in layouts.dev_matrix][0],
            "tensor_map": [list(t.dim) for t in layouts.tensor_map][0],
        }
    if not out:
        raise StrategyError(f"strategy file {path} describes no parameters")
    return out
