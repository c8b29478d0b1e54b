"""Decode benchmark: prefill (256 tokens) and greedy decode (64 tokens) on the `bench` preset, float32,
graph mode, batch 1 and 4; compile time separately; the result also as a fraction of the weight-read limit
(bytes of weights read per decoded token / memory-read bandwidth measured in the same run).

    .venv/bin/python benchmarks/decode.py [--backends cpu plain] [--repeats 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

import glm3  # noqa: E402

PROMPT, NEW = 256, 64


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> dict:
    """Bytes/s of reading memory: two threads summing halves of a large array, and a BLAS
    matrix-vector product over a 256 MiB matrix (the access pattern of decoding). Best of repeats."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    halves = np.array_split(data, os.cpu_count() or 1)
    best_sum = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best_sum = max(best_sum, data.nbytes / (time.perf_counter() - start))
    matrix = np.random.default_rng(0).standard_normal((65536, 1024), dtype=np.float32)
    vector = np.ones(1024, np.float32)
    best_gemv = 0.0
    for _ in range(repeats + 2):
        start = time.perf_counter()
        matrix @ vector
        best_gemv = max(best_gemv, matrix.nbytes / (time.perf_counter() - start))
    return {
        "threads_sum_GBps": best_sum / 1e9,
        "blas_gemv_GBps": best_gemv / 1e9,
        "limit_GBps": max(best_sum, best_gemv) / 1e9,
    }


def weight_bytes_per_token(model) -> int:
    """Every weight is read once per decoding step, except the embedding table (one row)."""
    total = 0
    for p in model.get_parameters():
        size = int(np.prod(p.shape)) * 4
        if p.name == "transformer.embedding.embedding_table":
            size = p.shape[1] * 4
        total += size
    return total


def run_generation(model, ids):
    stamps = []
    start = time.perf_counter()
    glm3.generate(
        model,
        ids,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=[],
        streamer=lambda t: stamps.append(time.perf_counter()),
    )
    return start, stamps


def measure(model, batch: int, repeats: int) -> dict:
    ids = np.random.default_rng(batch).integers(3, 64000, size=(batch, PROMPT)).astype(np.int32)
    start, stamps = run_generation(model, ids)
    first_wall = stamps[-1] - start
    prefill, decode = [], []
    for _ in range(repeats):
        start, stamps = run_generation(model, ids)
        prefill.append(stamps[0] - start)
        decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    prefill_s, step_s = min(prefill), min(decode)
    steady_wall = prefill_s + step_s * (NEW - 1)
    return {
        "batch": batch,
        "prefill_tokens_per_s": batch * PROMPT / prefill_s,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": batch / step_s,
        "decode_step_ms": step_s * 1e3,
        "compile_s": max(0.0, first_wall - steady_wall),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["auto", "plain"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    os.chdir(os.environ.get("TMPDIR", "/tmp"))  # graph compile may write diagnostics into the cwd
    bandwidth = read_bandwidth()
    config = glm3.GLM3Config.from_name("bench")
    results = []
    for backend in args.backends:
        model = glm3.GLM3ForCausalLM(config, dtype="float32", kernels_backend=backend, seed=0)
        model.set_train(False)
        per_token = weight_bytes_per_token(model)
        limit_tps = bandwidth["limit_GBps"] * 1e9 / per_token
        for batch in args.batches:
            r = measure(model, batch, args.repeats)
            r["backend"] = model.kernels_backend
            r["weight_read_limit_tokens_per_s"] = limit_tps * batch
            r["fraction_of_weight_read_limit"] = r["decode_tokens_per_s"] / (limit_tps * batch)
            results.append(r)
        del model
    print(
        json.dumps(
            {
                "benchmark": "decode",
                "preset": "bench",
                "dtype": "float32",
                "mode": "graph",
                "prompt_tokens": PROMPT,
                "new_tokens": NEW,
                "weight_bytes_per_token": per_token,
                "memory_read": bandwidth,
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
