"""The rehearsal at the real size: the whole DVC pipeline on the ChatGLM3-6B shape (6.24 B parameters, float16),
in a scratch clone of this repository's last commit, on this host. Prints one JSON object.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/pipeline_6b.py [--workdir DIR] [--keep]

It runs `dvc exp run` with the Makefile's REHEARSAL_6B overrides (what `make rehearsal-6b` runs: the 6B
synthetic checkpoint, float16, LoRA, two steps, C-Eval on the shipped sample, two ADGEN records). The synthetic
source is written once into GLM3_SYNTHETIC_CACHE (default ~/.cache/glm3/synthetic, outside the repo) and
hard-linked into models/hf. Reported per stage, from each stage's own process (GLM3_STAGE_STATS): wall time,
peak RSS from the kernel (VmHWM), the size of its output and how much of it is new (not hard links to an
earlier stage's files), and the dtypes of the tensors written; the LoRA step time; the batch-1 decode speed of
the merged 6B model beside the memory-read bandwidth measured in the same run; and the disk the run uses, DVC
cache included (hard links counted once). Targets: every stage <= 16 GiB peak RSS, the
inference stages (evaluate, adgen_eval) <= 1.15x the checkpoint, no float32 weights written, the run's disk <= 4x
the checkpoint. `--report-only --workdir DIR` measures a kept run again without re-running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
DECODE_SCRIPT = r"""
import json, os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from decode import read_bandwidth
bandwidth = read_bandwidth()
import mindspore as ms
ms.set_device("CPU"); ms.set_context(mode=ms.GRAPH_MODE)
import glm3
model = glm3.load_model(sys.argv[1])
ids = np.arange(3, 35, dtype=np.int32)[None]
stamps = []
glm3.generate(model, ids, max_new_tokens=4, eos_token_id=[])  # compile
start = time.perf_counter()
glm3.generate(model, ids, max_new_tokens=17, eos_token_id=[], streamer=lambda t: stamps.append(time.perf_counter()))
step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
from decode import weight_bytes_per_token
weights = weight_bytes_per_token(model)
print(json.dumps({"dtype": str(model.dtype), "decode_step_s": step, "decode_tokens_per_s": 1 / step,
                  "prefill_32_s": stamps[0] - start, "weight_bytes_per_token": weights, "memory_read": bandwidth,
                  "weight_read_limit_tokens_per_s": bandwidth["limit_GBps"] * 1e9 / weights,
                  "fraction_of_limit": (1 / step) / (bandwidth["limit_GBps"] * 1e9 / weights)}))
"""


def run(cmd, cwd, env, log):
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.monotonic() - start


def disk_bytes(path: str) -> int:
    """Bytes on disk under `path`, each inode once (hard links between workspace and DVC cache count once)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def output_sizes(path: str, seen: set) -> tuple[int, int]:
    """(bytes of the files under `path`, bytes of those whose inode no earlier stage's output holds). Hard links
    (the synthetic source into models/hf, the export's weights into models/merged) are outputs, not new data."""
    total = new = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                new += st.st_size
    return total, new


def tensor_dtypes(path: str) -> list[str]:
    """The storage types of every tensor in the .ckpt/.safetensors files under `path` (headers only)."""
    from glm3.weights.tensor_files import ckpt_tensor_types, safetensors_tensor_types

    found = set()
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if name.endswith(".ckpt"):
                found.update(ckpt_tensor_types(full).values())
            elif name.endswith(".safetensors"):
                found.update(safetensors_tensor_types(full).values())
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="where the scratch clone goes (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure and report the finished run kept in --workdir instead of running it again",
    )
    args = parser.parse_args()
    if args.report_only and not args.workdir:
        parser.error("--report-only needs the --workdir of a kept run")
    env = dict(os.environ, GLOG_v="3", DVC_NO_ANALYTICS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    work = args.workdir or tempfile.mkdtemp(prefix="glm3-6b-")
    clone = os.path.join(work, "glm3-pipeline")
    stats = os.path.join(work, "stage_stats.jsonl")
    if not args.report_only:
        shutil.rmtree(clone, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
        if os.path.exists(stats):
            os.unlink(stats)
    overrides = subprocess.run(
        ["make", "-s", "rehearsal-6b-args"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.split()
    env["GLM3_STAGE_STATS"] = stats
    log = os.path.join(work, "rehearsal.log")
    wall_file = os.path.join(work, "wall_seconds")
    if not args.report_only:
        wall = run(["dvc", "exp", "run", *overrides], clone, env, log)
        with open(wall_file, "w", encoding="utf-8") as f:
            f.write(f"{wall:.1f}\n")
    with open(wall_file, encoding="utf-8") as f:
        wall = float(f.read())

    sys.path.insert(0, os.path.join(REPO, "src"))
    from glm3.pipeline.layout import DVC_OUTPUTS

    with open(stats, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    stages, seen = {}, set()
    for r in records:
        out = os.path.join(clone, DVC_OUTPUTS[r["stage"]])
        output_bytes, new_bytes = output_sizes(out, seen)
        # The stage's own process (VmHWM). Its children's ru_maxrss is reported apart: for msrun workers it is
        # theirs, but a child forked from a loaded stage (MindSpore forks helpers) shows the parent's pages.
        stages[r["stage"]] = {
            "seconds": r["seconds"],
            "peak_rss_gib": round(r["peak_rss_bytes"] / GIB, 2),
            "peak_rss_vs_checkpoint": None,
            "children_peak_rss_gib": round(r["children_peak_rss_bytes"] / GIB, 2),
            "output_bytes": output_bytes,
            "new_bytes": new_bytes,
            "dtypes_written": tensor_dtypes(out),
        }
    checkpoint = sum(
        os.path.getsize(os.path.join(clone, "models", "ms", n))
        for n in os.listdir(os.path.join(clone, "models", "ms"))
        if n.endswith(".ckpt")
    )
    for stage in stages.values():
        stage["peak_rss_vs_checkpoint"] = round(stage["peak_rss_gib"] * GIB / checkpoint, 3)
    with open(os.path.join(clone, "models", "finetune", "metrics.json"), encoding="utf-8") as f:
        finetune = json.load(f)  # the run's own summary (metrics/finetune.json keeps a subset)
    with open(os.path.join(clone, "models", "finetune.timing.json"), encoding="utf-8") as f:
        timing = json.load(f)  # its speeds, beside the output
    with open(os.path.join(clone, "models", "finetune", "train_log.tsv"), encoding="utf-8") as f:
        steps = [line.split("\t") for line in f.read().splitlines()[1:]]
    decode = subprocess.run(
        [
            sys.executable,
            "-c",
            DECODE_SCRIPT,
            os.path.join(clone, "models", "merged"),
            os.path.dirname(os.path.abspath(__file__)),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if decode.returncode != 0:
        sys.exit(f"decode measurement failed:\n{decode.stderr[-3000:]}")
    run_disk = disk_bytes(clone)
    result = {
        "benchmark": "pipeline_6b",
        "overrides": overrides,
        "cores": os.cpu_count(),
        "wall_seconds": round(wall, 1),
        "checkpoint_bytes": checkpoint,
        "stages": stages,
        "lora": {
            "steps": finetune["steps"],
            "trainable_parameters": finetune["trainable_parameters"],
            "step_seconds_after_first": timing["step_seconds"],
            "tokens_per_second": timing["tokens_per_second"],
            "real_tokens_per_second": timing["real_tokens_per_second"],
            "losses": [float(s[2]) for s in steps],
        },
        "decode_6b_batch1": json.loads(decode.stdout.strip().splitlines()[-1]),
        "disk": {"run_bytes_incl_dvc_cache": run_disk, "vs_checkpoint": round(run_disk / checkpoint, 2)},
    }
    result["targets"] = {
        "every_stage_peak_rss_le_16gib": all(s["peak_rss_gib"] <= 16 for s in stages.values()),
        "inference_peak_rss_le_1.15x_checkpoint": all(
            stages[s]["peak_rss_vs_checkpoint"] <= 1.15 for s in ("evaluate", "adgen_eval")
        ),
        "no_float32_artifact": not any(
            t.lower().startswith(("float32", "f32"))
            for stage, s in stages.items()
            if stage != "finetune"
            for t in s["dtypes_written"]
        ),
        "run_disk_le_4x_checkpoint": run_disk <= 4 * checkpoint,
    }
    print(json.dumps(result, indent=2))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
