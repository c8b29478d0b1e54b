"""The chatglm.cpp side of `benchmarks/decode.py --peer chatglm-cpp`: run in the Python environment where the
pip package `chatglm-cpp` is installed (it builds with CMAKE_ARGS=-DCMAKE_POLICY_VERSION_MINIMUM=3.5), never
imported by glm3.

    PEER_PYTHON benchmarks/peer_chatglm_cpp.py --hf-dir DIR --dtype f32|f16|q8_0|q4_0 [--prompt 256 --new 64]

DIR is a HuggingFace model directory with the official ChatGLM3 modeling files (chatglm.cpp's converter loads
it through transformers). Greedy decoding of random prompt ids, stop tokens ignored; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HuggingFace model directory with the modeling files")
    parser.add_argument("--dtype", required=True, choices=["f32", "f16", "q8_0", "q4_0"], help="ggml weight type")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens to decode")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--vocab", type=int, default=64000, help="prompt ids are drawn from [3, vocab)")
    args = parser.parse_args()

    import chatglm_cpp
    from chatglm_cpp.convert import convert

    with tempfile.NamedTemporaryFile("wb", suffix=".bin") as f:
        start = time.perf_counter()
        convert(f, args.hf_dir, dtype=args.dtype)
        f.flush()
        convert_s = time.perf_counter() - start
        pipeline = chatglm_cpp.Pipeline(f.name, max_length=args.prompt + args.new + 8)
        ggml_bytes = os.path.getsize(f.name)
    ids = np.random.default_rng(1).integers(3, args.vocab, size=args.prompt).tolist()
    config = chatglm_cpp._C.GenerationConfig(
        max_length=args.prompt + args.new + 8,
        max_new_tokens=args.new,
        max_context_length=args.prompt + 8,
        do_sample=False,
    )
    model = pipeline.model
    best_prefill, best_step = float("inf"), float("inf")
    for _ in range(args.repeats + 1):  # the first run warms up
        tokens = list(ids)
        stamps = []
        start = time.perf_counter()
        n_past = 0
        for _ in range(args.new):
            tokens.append(model.generate_next_token(tokens, None, config, n_past, len(ids)))
            n_past = len(tokens) - 1
            stamps.append(time.perf_counter())
        best_prefill = min(best_prefill, stamps[0] - start)
        best_step = min(best_step, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    print(
        json.dumps(
            {
                "peer": "chatglm.cpp",
                "version": chatglm_cpp.__version__,
                "dtype": args.dtype,
                "ggml_file_bytes": ggml_bytes,
                "convert_s": convert_s,
                "prefill_s": best_prefill,
                "decode_step_ms": best_step * 1e3,
                "decode_tokens_per_s": 1.0 / best_step,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
