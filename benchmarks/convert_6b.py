"""Full-size ChatGLM3-6B conversion and loading: wall time and peak memory, printed as JSON.

Creates once (cached outside the repo, GLM3_BENCH_CACHE or ~/.cache/glm3/bench) a random-weight 6B
checkpoint in the release's layout (7 pytorch_model-*.bin shards + index, float16, 12.49 GB), then in
one run on the same disk measures:
  * `cp -r` of the source (the floor any converter is compared with);
  * `glm3 convert` to float16 MindSpore shards: wall time and the child's peak RSS (wait4);
  * `glm3.load_model` of the converted directory in float16: peak RSS against the checkpoint size.
Targets: convert peak RSS <= 3 GiB and wall <= 2x the copy; load peak RSS <= 1.3x the checkpoint.

    .venv/bin/python benchmarks/convert_6b.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

GIB = 2**30
LOAD_SCRIPT = """
import json, sys, time
import mindspore as ms
ms.set_device("CPU")
import glm3
t = time.perf_counter()
model = glm3.load_model(sys.argv[1], dtype="float16")
n = sum(p.size for p in model.get_parameters())
print(json.dumps({"seconds": time.perf_counter() - t, "parameters": int(n)}))
"""
BASELINE_SCRIPT = "import mindspore as ms; ms.set_device('CPU'); import glm3, glm3.weights.loading, glm3.modeling.model"


def run_measured(cmd: list[str]) -> dict:
    """Run a child; return its wall time, peak RSS (from the kernel, via wait4) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read the pipes fully before reaping, so the child never blocks on a full pipe.
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out.decode()}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache", default=os.environ.get("GLM3_BENCH_CACHE", os.path.expanduser("~/.cache/glm3/bench"))
    )
    parser.add_argument("--keep", action="store_true", help="keep the converted directory")
    args = parser.parse_args()

    # This process stays small and does no heavy work itself: a child's peak RSS as the kernel reports it
    # (ru_maxrss) starts from the RSS high-water mark of the process that spawned it.
    glm3_cli = [sys.executable, "-m", "glm3.cli"]
    src = os.path.join(args.cache, "glm3_6b-bin-float16")
    created = None
    if not os.path.isfile(os.path.join(src, "pytorch_model.bin.index.json")):
        created = run_measured(
            glm3_cli + ["download", "--synthetic", "glm3_6b", "--format", "bin", "--dst", src, "--overwrite"]
        )["seconds"]
    work = os.path.join(args.cache, "run")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src_bytes = dir_bytes(src)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".bin"))

    subprocess.run(["sync"], check=True)
    copy = run_measured(["cp", "-r", src, os.path.join(work, "copy")])
    shutil.rmtree(os.path.join(work, "copy"))
    subprocess.run(["sync"], check=True)

    dst = os.path.join(work, "ms")
    conv = run_measured(glm3_cli + ["convert", "--src", src, "--dst", dst, "--dtype", "float16", "--quiet"])
    subprocess.run(["sync"], check=True)
    ckpt_bytes = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".ckpt"))

    baseline = run_measured([sys.executable, "-c", BASELINE_SCRIPT])
    load = run_measured([sys.executable, "-c", LOAD_SCRIPT, dst])
    loaded = json.loads(load["stdout"].strip().splitlines()[-1])
    if not args.keep:
        shutil.rmtree(work)

    result = {
        "benchmark": "convert_6b",
        "source": {"path": src, "files": len(shards), "bytes": src_bytes, "created_seconds": created},
        "copy_seconds": round(copy["seconds"], 2),
        "convert": {
            "seconds": round(conv["seconds"], 2),
            "peak_rss_gib": round(conv["peak_rss_bytes"] / GIB, 3),
            "wall_vs_copy": round(conv["seconds"] / copy["seconds"], 3),
            "summary": conv["stdout"].strip(),
            "output_ckpt_bytes": ckpt_bytes,
        },
        "load_float16": {
            "seconds": round(loaded["seconds"], 2),
            "parameters": loaded["parameters"],
            "peak_rss_gib": round(load["peak_rss_bytes"] / GIB, 3),
            "peak_rss_vs_checkpoint": round(load["peak_rss_bytes"] / ckpt_bytes, 3),
            "import_baseline_rss_gib": round(baseline["peak_rss_bytes"] / GIB, 3),
        },
        "targets": {
            "convert_peak_rss_le_3gib": conv["peak_rss_bytes"] <= 3 * GIB,
            "convert_wall_le_2x_copy": conv["seconds"] <= 2 * copy["seconds"],
            "load_peak_rss_le_1.3x_checkpoint": load["peak_rss_bytes"] <= 1.3 * ckpt_bytes,
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
