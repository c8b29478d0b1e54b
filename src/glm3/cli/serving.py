"""`glm3 serve`: the OpenAI-compatible server."""

from __future__ import annotations

import dataclasses

from glm3.cli import common
from glm3.runtime.engine import EngineConfig
from glm3.runtime.kv_cache_manager import CacheConfig
from glm3.serve.server import ServerConfig


def cmd_serve(args) -> int:
    from glm3.serve.server import serve

    server = common.settings_from_args(ServerConfig, args, args.server_flags)
    cache = common.settings_from_args(CacheConfig, args, args.cache_flags)
    engine = common.settings_from_args(EngineConfig, args, args.engine_flags)
    engine = dataclasses.replace(engine, cache=cache)
    common.setup_mindspore(args.mode)
    return serve(args.model, server, engine, dtype=args.dtype, kernels=args.kernels)


def register(sub) -> None:
    """serve: the OpenAI-compatible server."""
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (continuous batching on a paged KV cache)",
        description="Serves POST /v1/chat/completions (streaming, tools), POST /v1/completions, GET /v1/models, "
        "GET /v1/stats and GET /health. --model is a model directory (run eagerly with the CPU kernels) or a "
        "paged export (glm3 export --paged; its block size, block count and batch are its own). Requests are "
        "batched as they come: each joins the running batch at the next token and leaves when done. "
        "Listens on 127.0.0.1 unless --host says otherwise; Ctrl-C stops it.",
    )
    common.add_model_args(p)
    server_flags = common.add_settings_flags(p, ServerConfig)
    engine_flags = common.add_settings_flags(p, EngineConfig)
    cache_flags = common.add_settings_flags(p, CacheConfig)
    p.set_defaults(func=cmd_serve, server_flags=server_flags, engine_flags=engine_flags, cache_flags=cache_flags)
