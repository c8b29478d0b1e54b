"""`glm3 prefect up` for real: a local Prefect server on a free loopback port serving the glm3 deployments;
`prefect deployment run` to Completed, task caching, artifacts and logs read back from the server's API."""

import glob
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import free_port, project_clone, subprocess_env

pytestmark = pytest.mark.integration  # real DVC / a real Prefect server: minutes


def api(url, path, body):
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("prefect")
    root = project_clone(base / "glm3-pipeline")  # a clean project: no models/ at all
    env = subprocess_env(PREFECT_HOME=str(base / "prefect-home"))
    port = free_port()
    proc = subprocess.Popen(
        ["glm3", "prefect", "up", "--project", root, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, seen, deadline = f"http://127.0.0.1:{port}/api", [], time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "glm3 prefect up exited:\n" + "".join(seen)
            continue
        seen.append(line)
        if line.strip() == url:
            break
    else:
        pytest.fail("no API URL line within 240 s:\n" + "".join(seen))
    yield root, url, dict(env, PREFECT_API_URL=url)

    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(OSError):  # the server went down with it
        urllib.request.urlopen(f"{url}/health", timeout=5)


def run_deployment(env, name, *params):
    args = [a for p in params for a in ("--param", p)]
    proc = subprocess.run(
        ["prefect", "deployment", "run", name, *args, "--watch", "--watch-timeout", "900"],
        env=env,
        capture_output=True,
        text=True,
        timeout=960,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)


def task_states(url, flow_run):
    runs = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}  # run names are <task>-<suffix>


def test_finetune_deployment_completes_with_metrics_artifact_and_logs(served):
    """The users' entry point, as the first thing run in a fresh clone: without models/ms the finetune
    deployment makes it (download, convert) and goes on."""
    root, url, env = served
    assert not os.path.exists(os.path.join(root, "models", "ms"))
    flow_run = run_deployment(env, "glm3/finetune", "lr=0.001", "steps=6")
    run = api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}})[0]
    assert run["state"]["type"] == "COMPLETED" and run["parameters"]["lr"] == 0.001
    assert task_states(url, flow_run) == {
        s: "Completed"
        for s in ("download", "convert", "rank_table", "finetune", "merge", "export", "evaluate", "adgen_eval")
    }

    [finetune] = [d for d in glob.glob(os.path.join(root, "models", "prefect", "finetune-*")) if os.path.isdir(d)]
    with open(os.path.join(finetune, "train_log.tsv"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 1 + 6
    with open(os.path.join(finetune, "finetune.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == 6
    [evaluate] = glob.glob(os.path.join(root, "models", "prefect", "evaluate-*"))
    with open(os.path.join(evaluate, "ceval.json"), encoding="utf-8") as f:
        ceval = json.load(f)
    assert ceval["questions"] == 16
    assert not os.path.exists(os.path.join(root, "models", "finetune"))  # the DVC layout is left alone

    artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["glm3-metrics"]}}})
    markdown = next(a for a in artifacts if a["flow_run_id"] == flow_run)
    assert markdown["type"] == "markdown"
    assert "| finetune |" in markdown["data"] and "steps=6" in markdown["data"]
    assert f"| Other | {ceval['categories']['Other']} |" in markdown["data"]

    logs = [entry["message"] for entry in api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run]}}})]
    assert any(m.startswith("finetune: ") and "lr 0.001" in m for m in logs)  # the library's logger, in Prefect
    assert any("models/ms is missing: running download and convert first" in m for m in logs)


def test_same_parameters_again_are_cached_and_new_ones_run(served):
    root, url, env = served
    again = run_deployment(env, "glm3/finetune", "lr=0.001", "steps=6")
    assert set(task_states(url, again).values()) == {"Cached"}

    changed = run_deployment(env, "glm3/finetune", "lr=0.001", "steps=6", 'overrides={"evaluate.shots": 1}')
    states = task_states(url, changed)
    assert states.pop("evaluate") == "Completed" and set(states.values()) == {"Cached"}


def test_pipeline_deployment_runs_every_stage(served):
    root, url, env = served
    flow_run = run_deployment(env, "glm3/pipeline", "steps=3", "lora=true")
    states = task_states(url, flow_run)
    for stage in ("download", "convert", "rank_table"):  # same params and code as the fine-tune runs' own
        assert states.pop(stage) == "Cached", stage
    assert states == {s: "Completed" for s in ("finetune", "merge", "export", "evaluate", "adgen_eval")}
    assert len(glob.glob(os.path.join(root, "models", "prefect", "convert-*"))) == 1
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["glm3-metrics"]}}})
    markdown = next(a["data"] for a in artifacts if a["flow_run_id"] == flow_run)
    outputs = dict(re.findall(r"^\| (\w+) \| `([^`]+)` \|", markdown, re.M))  # stage -> its output directory
    assert list(outputs) == [
        "download",
        "convert",
        "rank_table",
        "finetune",
        "merge",
        "export",
        "evaluate",
        "adgen_eval",
    ]
    assert "mode=lora" in markdown
    assert os.path.isfile(os.path.join(root, outputs["finetune"], "adapter", "adapter_config.json"))
    assert os.path.isfile(os.path.join(root, outputs["merge"], "config.json"))  # the adapter folded in
    assert os.path.isfile(os.path.join(root, outputs["export"], "decode.mindir"))


# A flow of the download task alone, as the pipeline defines it (its retries included), run against the server.
RETRY_FLOW = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from prefect import flow
from flows.pipeline import TASKS
from glm3.pipeline import Layout, load_params

@flow(name="glm3-download-retry")
def download_only(root):
    params = load_params(os.path.join(root, "params.yaml"), {"download.source": "hub", "download.revision": "main",
                                                             "download.repo": "THUDM/chatglm3-6b"})
    return TASKS["download"](params, Layout.keyed(root, params, ["download"]))

print(json.dumps(download_only(sys.argv[1])))
"""


def test_a_failed_download_is_retried_and_the_retry_succeeds(served, tiny_dir, tmp_path):
    from hub_server import FakeHub

    root, url, env = served
    with FakeHub() as hub:
        hub.add_repo("THUDM/chatglm3-6b", tiny_dir, "0123456789abcdef0123456789abcdef01234567")
        hub.down_until = time.monotonic() + 5  # the first attempt meets an outage; the retry, 10 s later, not
        done = subprocess.run(
            [sys.executable, "-c", RETRY_FLOW, root],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(env, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home")),
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["source"] == "hub"
    assert "503" in done.stdout + done.stderr  # the first attempt's failure, logged
    runs = api(url, "/task_runs/filter", {"task_runs": {"name": {"like_": "download"}}})
    [retried] = [r for r in runs if r["run_count"] > 1]
    assert retried["state"]["name"] == "Completed" and retried["run_count"] == 2  # failed once, then succeeded
    hub_downloads = glob.glob(os.path.join(root, "models", "prefect", "download-*", "source.json"))
    assert len(hub_downloads) == 1  # the retry published the download; the failed attempt left nothing
