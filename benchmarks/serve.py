"""Serving benchmark: `glm3 serve` under 1, 4 and 16 concurrent clients, each asking for 64 new tokens after a
256-token prompt, against the same requests served one at a time (as THUDM's openai_api_demo serves), and the
single-stream decode speed of benchmarks/decode.py measured in the same run.

    .venv/bin/python benchmarks/serve.py [--preset bench] [--clients 1 4 16] [--rounds 3]
    .venv/bin/python benchmarks/serve.py --preset glm3_6b --clients 1 4 --prompt-tokens 128 --new-tokens 16

The server runs the preset's seeded random-weight checkpoint (the synthetic cache, ~/.cache/glm3/synthetic),
eagerly with the CPU kernels. Clients stream /v1/completions with token-id prompts and `return_token_ids`, so
every token's arrival is timed (the random weights write tokens beyond the shipped tokenizer's vocabulary,
which have no text). Each concurrency level runs `rounds` rounds of that many simultaneous requests, after a
warm-up that compiles every decode width. Prints one JSON object: per level the aggregate generated tokens/s,
time to first token and inter-token latency (p50, p99), the one-at-a-time throughput, the ratios and the
targets (16 clients >= 3x one at a time; 1 client's decode >= 0.9x decode.py's batch-1 decode), and the
server's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gib(pid: int) -> float:
    from glm3.memory import peak_rss_bytes

    return peak_rss_bytes(pid) / 2**30


def stream_request(url: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed completion: when it was sent, when each token arrived."""
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
        "ignore_eos": True,  # every request generates new_tokens
    }
    stamps, sent = [], time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0].get("token_ids"):
                    stamps.extend([time.perf_counter()] * len(choices[0]["token_ids"]))
    return {"sent": sent, "stamps": stamps}


def concurrent(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[dict], float]:
    """All prompts at once, one client thread each: (per-request timings, wall seconds)."""
    results: list[dict | None] = [None] * len(prompts)

    def client(i):
        results[i] = stream_request(url, prompts[i], new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summary(requests: list[dict], wall: float) -> dict:
    ttft = [r["stamps"][0] - r["sent"] for r in requests]
    itl = [b - a for r in requests for a, b in zip(r["stamps"], r["stamps"][1:])]
    decode = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in requests if len(r["stamps"]) > 1]
    tokens = sum(len(r["stamps"]) for r in requests)
    return {
        "requests": len(requests),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_s": {"p50": round(float(np.percentile(ttft, 50)), 4), "p99": round(float(np.percentile(ttft, 99)), 4)},
        "itl_ms": {
            "p50": round(float(np.percentile(itl, 50)) * 1e3, 2),
            "p99": round(float(np.percentile(itl, 99)) * 1e3, 2),
        },
        "decode_tokens_per_s_per_stream": round(float(np.mean(decode)), 2),
    }


def decode_benchmark() -> dict:
    """benchmarks/decode.py at batch 1 (float32 bench shape; the same kernels), run now in its own process."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "decode.py"), "--weights", "f32", "--batches", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    b1 = report["formats"]["f32"]["ours"]["results"][0]
    return {"decode_tokens_per_s": b1["decode_tokens_per_s"], "memory_read": report["memory_read"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench", help="synthetic preset to serve (bench, glm3_6b, ...)")
    parser.add_argument("--model", help="serve this model directory instead (e.g. glm3 download --synthetic's)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of simultaneous requests per level")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `glm3 serve` flags")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(REPO, "src"))
    from glm3.modeling.config import GLM3Config
    from glm3.weights.synthetic import cached_synthetic_checkpoint

    work = tempfile.mkdtemp(prefix="glm3-serve-bench-")
    model = args.model or cached_synthetic_checkpoint(os.path.join(work, "model"), args.preset)
    vocab = GLM3Config.from_hf(model).padded_vocab_size
    rng = np.random.default_rng(0)
    most = max(args.clients)
    prompts = [rng.integers(3, vocab - 16, args.prompt_tokens).tolist() for _ in range(most * args.rounds)]

    decode = decode_benchmark() if args.preset == "bench" else None
    if decode is None:
        sys.path.insert(0, HERE)
        from decode import read_bandwidth

        memory_read = read_bandwidth()
    else:
        memory_read = decode["memory_read"]
    # A cache that holds every sequence of the widest level at once (else the engine swaps, as it should).
    num_blocks = most * -(-(args.prompt_tokens + args.new_tokens) // 16) + 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "serve.log"), "w")
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "glm3.cli", "serve", "--model", model, "--port", str(port),
         "--max-num-seqs", str(most), "--num-blocks", str(num_blocks), *args.serve_args],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, GLOG_v="3"),
    )  # fmt: skip
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        load_s = time.perf_counter() - started
        warm = time.perf_counter()
        for level in sorted(set(args.clients)):  # compiles every decode width (and the table widths) once
            concurrent(url, prompts[:level], args.new_tokens)
        warmup_s = time.perf_counter() - warm
        levels = {}
        for level in args.clients:
            timings, wall = [], 0.0
            for r in range(args.rounds):
                batch, seconds = concurrent(url, prompts[r * level : (r + 1) * level], args.new_tokens)
                timings += batch
                wall += seconds
            levels[str(level)] = summary(timings, wall)
        one_by_one = prompts[:most]
        start = time.perf_counter()
        sequential = [stream_request(url, p, args.new_tokens) for p in one_by_one]
        baseline = summary(sequential, time.perf_counter() - start)
        rss = peak_rss_gib(server.pid)
        stats = httpx.get(url + "/v1/stats").json()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    top = levels[str(most)]
    report = {
        "benchmark": "serve",
        "preset": args.preset,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "server": {
            "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2),
            "peak_rss_gib": round(rss, 2),
            "stats": stats,
        },  # fmt: skip
        "concurrent": levels,
        "one_at_a_time": baseline,
        f"throughput_{most}_clients_vs_one_at_a_time": round(top["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "memory_read": memory_read,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
    }
    if decode is not None:
        one = levels.get("1")
        report["decode_py_batch1"] = {"decode_tokens_per_s": decode["decode_tokens_per_s"]}
        targets = {f"{most}_clients_>=_3x_one_at_a_time": report[f"throughput_{most}_clients_vs_one_at_a_time"] >= 3}
        if one is not None:
            ratio = one["decode_tokens_per_s_per_stream"] / decode["decode_tokens_per_s"]
            report["one_client_decode_vs_decode_py"] = round(ratio, 3)
            targets["one_client_decode_>=_0.9x_decode_py"] = ratio >= 0.9
        report["targets_met"] = targets
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
