"""Engines for what `glm3 serve` serves: a model directory (run eagerly with compiled steps, paged KV cache) or
a paged export's directory (its MindIR graphs, with the block size, block count and batch they were exported
with). Serving code picks the runner here so that the engine itself never imports the deploy layer."""

from __future__ import annotations

import dataclasses
import os

from glm3.runtime.engine import Engine, EngineConfig, ModelLimits


def _pow2_widths(most: int, least: int) -> tuple[int, ...]:
    widths = [least]
    while widths[-1] < most:
        widths.append(widths[-1] * 2)
    return tuple(widths)


def load_engine(path: str | os.PathLike, config: EngineConfig, dtype: str = "auto", kernels: str = "auto"):
    """(Engine, tokenizer) for a model directory (run eagerly, with compiled steps) or a paged export's
    directory (its MindIR graphs; its own block size, block count and batch)."""
    from glm3.deploy.export import EXPORT_CONFIG
    from glm3.modeling.tokenizer import load_tokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory")
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        runner, limits, config, description = _export_runner(path, config)
    else:
        runner, limits, description = _eager_runner(path, config, dtype, kernels)
    return Engine(runner, limits, config, description), load_tokenizer(path)


def _eager_runner(path: str, config: EngineConfig, dtype: str, kernels: str):
    import glm3
    from glm3.dtypes import name_of as dtype_name
    from glm3.kernels import resolve_backend
    from glm3.memory import check_memory, inference_estimate
    from glm3.modeling.config import GLM3Config, resolve_dtype
    from glm3.runtime.model_runner import CacheGeometry, PagedRunner, StepShapes
    from glm3.runtime.steps import compiled_step

    model_config = GLM3Config.from_hf(path)
    backend = resolve_backend(kernels)
    # With the CPU kernels every decode width gives the same rows; otherwise one width only (see the module).
    # Attention's batched matmul runs over rows x groups, which is never 1 with two or more groups.
    least = 1 if model_config.num_kv_groups >= 2 else 2
    widths = _pow2_widths(config.max_num_seqs, least) if backend == "cpu" else (config.max_num_seqs,)
    cache = config.cache
    check_memory(
        inference_estimate(  # prompts are prefilled one at a time: the activations of one
            model_config,
            resolve_dtype(dtype, model_config),
            batch=1,
            kernels=backend == "cpu",
            cache_tokens=cache.num_blocks * cache.block_size,
            what=f"serving {path}",
        )
    )
    model = glm3.load_model(path, dtype=dtype, kernels_backend=backend, kernel_rows=max(widths))
    c = model.config
    shapes = StepShapes(-(-c.seq_length // cache.block_size), decode_widths=widths)
    geometry = CacheGeometry(c.num_layers, c.num_kv_groups, c.kv_channels, cache)
    runner = PagedRunner(compiled_step(model, "paged_prefill"), compiled_step(model, "paged_decode"), geometry, shapes)
    limits = ModelLimits(c.seq_length, c.seq_length - 1, c.padded_vocab_size, model.end_token_ids)
    return (
        runner,
        limits,
        f"{path} (eager, {dtype_name(model.dtype)} weights, {backend} kernels, decode widths {list(widths)})",
    )


def _export_runner(path: str, config: EngineConfig):
    from glm3.deploy.export import ExportError
    from glm3.deploy.infer import MindIRRunner

    graphs = MindIRRunner(path)
    c = graphs.config
    if not c.paged:
        raise ExportError(
            f"{path} is a static-cache export; serving needs a paged one (export with --paged, or "
            "export.paged: true in params.yaml)"
        )
    runner = graphs.model_runner(c.batch_size or config.max_num_seqs, together=False)
    limits = ModelLimits(c.seq_length, c.prompt_length, c.vocab_size, frozenset(c.stop_token_ids))
    batch = "dynamic" if c.batch_size is None else c.batch_size
    config = dataclasses.replace(config, cache=c.cache_config)
    return runner, limits, config, f"{path} (paged export, {c.dtype} weights, {graphs.backend}, batch {batch})"
