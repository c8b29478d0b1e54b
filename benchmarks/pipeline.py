"""The DVC pipeline's wall times from a fresh `git clone` of this repository (its last commit), offline:
the first `dvc repro` of the embedded default, a second (no-op) one, and one after a finetune.lr change.
Prints one JSON object. Run from the repository with the venv's bin on PATH (`make bench` does)."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd, cwd, env):
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return round(seconds, 2), re.findall(r"Running stage '(\w+)'", proc.stdout)


def main() -> None:
    env = dict(os.environ, GLOG_v="3", DVC_NO_ANALYTICS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    with tempfile.TemporaryDirectory(prefix="glm3-pipeline-bench-") as tmp:
        clone = os.path.join(tmp, "glm3-pipeline")
        subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
        fresh, fresh_ran = timed(["dvc", "repro"], clone, env)
        noop, noop_ran = timed(["dvc", "repro"], clone, env)
        params = os.path.join(clone, "params.yaml")
        with open(params, encoding="utf-8") as f:
            text = f.read()
        with open(params, "w", encoding="utf-8") as f:
            f.write(re.sub(r"(?m)^(  lr:)\s*\S+", r"\1 3.0e-3", text, count=1))
        changed, changed_ran = timed(["dvc", "repro"], clone, env)
        with open(os.path.join(clone, "models", "finetune.timing.json"), encoding="utf-8") as f:
            finetune = json.load(f)  # the stage's speeds, kept out of its output and metrics
    print(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "fresh_repro_s": fresh,
                "fresh_stages": fresh_ran,
                "noop_repro_s": noop,
                "noop_stages": noop_ran,
                "lr_change_repro_s": changed,
                "lr_change_stages": changed_ran,
                "finetune_tokens_per_second": finetune["tokens_per_second"],
                "finetune_real_tokens_per_second": finetune["real_tokens_per_second"],
            }
        )
    )


if __name__ == "__main__":
    main()
