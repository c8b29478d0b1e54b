"""Decode benchmark: prefill and greedy decode of one checkpoint in several weight formats (float32, float16,
8-bit and 4-bit weight-only quantized), batch 1 and 4, graph mode, each format in a child process (its own
peak RSS); the speed beside the weight-read limit: bytes of weights read per decoded token over the host's
streaming-read bandwidth measured in the same run (glm3.kernels.bandwidth; numpy figures beside it). With
`--peer chatglm-cpp` the C++ engine decodes the same checkpoint in the same run and the ratios are printed.

    .venv/bin/python benchmarks/decode.py [--preset bench] [--weights f32 f16 q8 q4] [--batches 1 4]
        [--peer chatglm-cpp --peer-python PY --peer-modeling DIR]

The checkpoints (synthetic random weights of the preset, converted and quantized by glm3's own commands) are
kept in --workdir (default ~/.cache/glm3/bench-decode). chatglm.cpp's converter reads a HuggingFace directory
through transformers: ours, written by `glm3 convert --to hf`, plus the official ChatGLM3 modeling files from
--peer-modeling (configuration_, modeling_, tokenization_chatglm.py and quantization.py; from the
THUDM/chatglm3-6b repository, never part of this project). PY is a Python with the pip package chatglm-cpp
(CMAKE_ARGS=-DCMAKE_POLICY_VERSION_MINIMUM=3.5 pip install chatglm-cpp) and transformers 4.x.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

WEIGHTS = {"f32": "float32", "f16": "float16", "q8": 8, "q4": 4}
PEER_TYPES = {"f32": "f32", "f16": "f16", "q8": "q8_0", "q4": "q4_0"}
MODELING_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")


def numpy_bandwidth(gib: float = 1.0, repeats: int = 3) -> dict:
    """Bytes/s of numpy reading memory: threads summing parts of a large array, and a BLAS matrix-vector
    product over a 256 MiB matrix. Best of repeats (for comparison with the streaming kernel)."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    best_sum = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in parts]
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
    return {"numpy_threads_sum_GBps": best_sum / 1e9, "numpy_blas_gemv_GBps": best_gemv / 1e9}


def read_bandwidth() -> dict:
    """The memory-read figures of this host (the other benchmarks report them too): `limit_GBps` is the
    streaming-read kernel's, the one every fraction of the limit uses."""
    from glm3.kernels.bandwidth import stream_read_bandwidth

    stream = stream_read_bandwidth()
    numpy_figures = numpy_bandwidth()
    limit = stream / 1e9 if stream else max(numpy_figures.values())
    return {"stream_read_GBps": stream / 1e9 if stream else None, **numpy_figures, "limit_GBps": limit}


def prepare(workdir: str, preset: str, names: list[str], peer: bool) -> dict[str, str]:
    """Model directories of every weight format (and the HF directory for the peer), made once."""
    import glm3

    os.makedirs(workdir, exist_ok=True)
    from glm3.weights.synthetic import cached_synthetic_checkpoint

    source = os.path.join(workdir, "source")
    if not os.path.isdir(source):  # hard links into glm3's synthetic-checkpoint cache
        cached_synthetic_checkpoint(source, preset, progress=False)
    dirs = {}
    for name in names:
        path = os.path.join(workdir, name)
        if not os.path.isdir(path):
            if isinstance(WEIGHTS[name], str):
                glm3.convert_checkpoint(source, path, dtype=WEIGHTS[name], progress=False)
            else:
                if not os.path.isdir(os.path.join(workdir, "f16")):
                    glm3.convert_checkpoint(source, os.path.join(workdir, "f16"), dtype="float16", progress=False)
                glm3.quantize_model(os.path.join(workdir, "f16"), path, WEIGHTS[name], progress=False)
        dirs[name] = path
    if peer:
        hf = os.path.join(workdir, "hf")
        if not os.path.isdir(hf):
            ours = os.path.join(workdir, "f32")
            if not os.path.isdir(ours):
                glm3.convert_checkpoint(source, ours, dtype="float32", progress=False)
            glm3.convert_checkpoint(ours, hf, to="hf", dtype="float32", progress=False)
        dirs["hf"] = hf
    return dirs


def weight_bytes_per_token(model) -> int:
    """Every weight is read once per decoding step, except the embedding table (one row)."""
    total = 0
    for p in model.get_parameters():
        size = int(np.prod(p.shape)) * p.itemsize
        if p.name.startswith("transformer.embedding.embedding_table"):
            size //= p.shape[0]
        total += size
    return total


def measure_one(path: str, batches: list[int], prompt: int, new: int, repeats: int) -> dict:
    """(child process) Load `path` and time generation at each batch."""
    import mindspore as ms

    import glm3
    from glm3.memory import peak_rss_bytes

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    start = time.perf_counter()
    model = glm3.load_model(path)
    load_s = time.perf_counter() - start
    vocab = min(64000, model.config.padded_vocab_size)
    results = []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, vocab, size=(batch, prompt)).astype(np.int32)
        prefill, decode, first_wall = [], [], None
        for run in range(repeats + 1):
            stamps = []
            start = time.perf_counter()
            glm3.generate(
                model,
                ids,
                max_new_tokens=new,
                eos_token_id=[],
                streamer=lambda t, s=stamps: s.append(time.perf_counter()),
            )
            if run == 0:
                first_wall = stamps[-1] - start
                continue
            prefill.append(stamps[0] - start)
            decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        prefill_s, step_s = min(prefill), min(decode)
        results.append(
            {
                "batch": batch,
                "prefill_s": prefill_s,
                "prefill_tokens_per_s": batch * prompt / prefill_s,
                "decode_step_ms": step_s * 1e3,
                "decode_tokens_per_s": batch / step_s,
                "compile_s": max(0.0, first_wall - prefill_s - step_s * (new - 1)),
            }
        )
    return {
        "load_s": load_s,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "backend": model.kernels_backend,
        "results": results,
        "peak_rss_GB": peak_rss_bytes() / 1e9,  # VmHWM: ru_maxrss would start from this benchmark's own peak
    }


def run_child(args, name: str, path: str) -> dict:
    command = [sys.executable, __file__, "--child", path, "--prompt", str(args.prompt), "--new", str(args.new)]
    command += ["--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.environ.get("TMPDIR", "/tmp"))
    if done.returncode != 0:
        raise SystemExit(f"decode benchmark of {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_peer(args, name: str, hf_dir: str) -> dict:
    modeling = os.path.join(args.workdir, "hf-peer")
    if not os.path.isdir(modeling):  # our HF directory plus the official modeling files, for transformers
        shutil.copytree(hf_dir, modeling + ".tmp", dirs_exist_ok=True)
        for f in MODELING_FILES:
            shutil.copy(os.path.join(args.peer_modeling, f), os.path.join(modeling + ".tmp", f))
        os.replace(modeling + ".tmp", modeling)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_chatglm_cpp.py")
    command = [args.peer_python, script, "--hf-dir", modeling, "--dtype", PEER_TYPES[name]]
    command += ["--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.environ.get("TMPDIR", "/tmp"))
    if done.returncode != 0:
        raise SystemExit(f"chatglm.cpp ({PEER_TYPES[name]}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench", help="model shape (glm3.GLM3Config presets): bench, glm3_6b")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS), help="formats")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens decoded")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the best is reported")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/glm3/bench-decode"), help="checkpoints")
    parser.add_argument("--peer", choices=["chatglm-cpp"], help="also run this engine on the same checkpoint")
    parser.add_argument("--peer-python", default=os.environ.get("CHATGLM_CPP_PYTHON"), help="its Python")
    parser.add_argument("--peer-modeling", help="directory of the official ChatGLM3 modeling files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.child, args.batches, args.prompt, args.new, args.repeats)))
        return 0
    if args.peer and not (args.peer_python and args.peer_modeling):
        parser.error("--peer chatglm-cpp needs --peer-python (or CHATGLM_CPP_PYTHON) and --peer-modeling")
    workdir = os.path.join(args.workdir, args.preset)
    args.workdir = workdir
    dirs = prepare(workdir, args.preset, args.weights, bool(args.peer))

    memory = read_bandwidth()
    limit = memory["limit_GBps"] * 1e9
    formats = {}
    for name in args.weights:
        ours = run_child(args, name, dirs[name])
        for r in ours["results"]:
            per_token = ours["weight_bytes_per_token"]
            r["weight_read_limit_tokens_per_s"] = limit / per_token * r["batch"]
            r["fraction_of_limit"] = r["decode_tokens_per_s"] / r["weight_read_limit_tokens_per_s"]
        entry = {"ours": ours}
        if args.peer:
            peer = run_peer(args, name, dirs["hf"])
            b1 = next(r for r in ours["results"] if r["batch"] == 1)
            entry["chatglm_cpp"] = peer
            entry["ratios_vs_chatglm_cpp"] = {
                "decode_b1": b1["decode_tokens_per_s"] / peer["decode_tokens_per_s"],
                "prefill_b1": peer["prefill_s"] / b1["prefill_s"],
            }
        formats[name] = entry
    print(
        json.dumps(
            {
                "benchmark": "decode",
                "preset": args.preset,
                "mode": "graph",
                "prompt_tokens": args.prompt,
                "new_tokens": args.new,
                "memory_read": memory,
                "formats": formats,
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
