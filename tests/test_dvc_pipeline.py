"""The DVC pipeline for real: `dvc repro` in a fresh clone, offline, then no-op, params changes, an
interrupted stage, experiments, metrics, plots, push and pull."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from conftest import GIT_IDENTITY, project_clone, subprocess_env
from glm3.pipeline.layout import DVC_OUTPUTS
from glm3.pipeline.stages import ORDER

pytestmark = pytest.mark.integration  # real DVC / a real Prefect server: minutes

ENV = subprocess_env(DVC_NO_ANALYTICS="1", **GIT_IDENTITY)


def dvc(*args, cwd, timeout=900, check=True):
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def set_param(project, section, key, value):
    path = os.path.join(project, "params.yaml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    params = yaml.safe_load(text)
    assert key in params[section]
    # Edit the one line (keeps the comments, as a user's edit would).
    new, count = re.subn(rf"(?m)^(  {key}:)\s*[^#\n]*", rf"\g<1> {value}  ", text)
    assert count == 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    assert yaml.safe_load(new)[section][key] == yaml.safe_load(str(value))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh clone after one `dvc repro` of the embedded default."""
    root = project_clone(tmp_path_factory.mktemp("dvc") / "glm3-pipeline")
    before = json.loads(dvc("status", "--json", cwd=root).stdout)
    out = dvc("repro", cwd=root).stdout
    return root, out, before


def test_committed_lock_describes_the_committed_code_and_params(project):
    """A fresh clone lacks only the cached outputs: every dependency and parameter matches dvc.lock."""
    before = project[2]
    assert set(before) == set(ORDER)
    outputs = set(DVC_OUTPUTS.values())
    stale = {
        stage: change
        for stage, changes in before.items()
        for change in changes
        if not isinstance(change, dict)
        or set(change) - {"changed outs", "changed deps"}
        or any(
            state not in ("deleted", "not in cache") or path not in outputs
            for kind in change.values()
            for path, state in kind.items()
        )
    }
    assert not stale, f"dvc.lock is stale (run `make run` and commit dvc.lock and metrics/): {stale}"


def test_fresh_clone_reproduces_every_stage_offline(project):
    root, out, _ = project
    assert ran(out) == list(ORDER)
    for stage, path in DVC_OUTPUTS.items():
        assert os.path.isdir(os.path.join(root, path)), stage
    assert os.path.isfile(os.path.join(root, "models", "export", "prefill.mindir"))
    with open(os.path.join(root, "metrics", "finetune.json"), encoding="utf-8") as f:
        finetune = json.load(f)
    assert finetune["steps"] == 30 and finetune["final_loss"] < finetune["first_loss"]
    with open(os.path.join(root, "metrics", "ceval.json"), encoding="utf-8") as f:
        ceval = json.load(f)
    assert ceval["questions"] == 16 and 0 <= ceval["average"] <= 100
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"


def test_second_repro_is_a_quick_no_op(project):
    root = project[0]
    out = dvc("repro", cwd=root).stdout
    assert ran(out) == [] and "up to date" in out  # nothing ran, whatever the host's load


def _outs(lock_text: str) -> dict[str, str]:
    """{stage: md5 of its first output} of a dvc.lock."""
    return {name: stage["outs"][0]["md5"] for name, stage in yaml.safe_load(lock_text)["stages"].items()}


def test_a_repro_from_scratch_writes_the_same_lock_metrics_and_plots(project):
    """Bit-identical outputs: every stage run again (dvc repro --force) gives the same dvc.lock, metrics and
    plots; the fine-tuning speed, which differs on every run, is kept beside the output, not in it."""
    root = project[0]
    tracked = ["dvc.lock"] + [os.path.join("metrics", n) for n in sorted(os.listdir(os.path.join(root, "metrics")))]
    assert {"metrics/loss.png", "metrics/finetune.json", "metrics/ceval_categories.png"} <= set(tracked)

    def contents():
        return {path: open(os.path.join(root, path), "rb").read() for path in tracked}

    timing_path = os.path.join(root, "models", "finetune.timing.json")
    first, first_timing = contents(), os.path.getmtime(timing_path)
    assert ran(dvc("repro", "--force", cwd=root).stdout) == list(ORDER)
    assert [path for path, data in contents().items() if data != first[path]] == []
    assert os.path.getmtime(timing_path) > first_timing  # written again, outside the outputs
    with open(timing_path, encoding="utf-8") as f:
        assert json.load(f)["timed_steps"] == 29
    # What does not depend on floating-point training is the same on every machine, so equal to the commit's.
    committed = _outs(
        subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True, check=True).stdout
    )
    with open(os.path.join(root, "dvc.lock"), encoding="utf-8") as f:
        now = _outs(f.read())
    for stage in ("download", "convert", "rank_table"):
        assert now[stage] == committed[stage], stage


def test_metrics_and_plots_show_the_run(project):
    root = project[0]
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=root).stdout)
    data = next(iter(metrics.values()))["data"]
    assert data["metrics/finetune.json"]["data"]["steps"] == 30
    assert set(data["metrics/ceval.json"]["data"]["categories"]) == {"STEM", "Social Science", "Humanities", "Other"}
    assert "bleu-4" in data["metrics/adgen.json"]["data"]
    plots = json.loads(dvc("plots", "show", "--json", cwd=root).stdout)["data"]
    assert {path: [p["type"] for p in plot] for path, plot in plots.items()} == {
        "metrics/loss.png": ["image"],
        "metrics/ceval_categories.png": ["image"],
    }
    dvc("plots", "show", cwd=root)
    with open(os.path.join(root, "dvc_plots", "index.html"), encoding="utf-8") as f:
        page = f.read()
    # Viewable offline: the page loads nothing from the internet and shows both images.
    assert "<script" not in page and not re.search(r"(src|href)=\"?https?:", page)
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == [
        "static/workspace_metrics_ceval_categories.png",
        "static/workspace_metrics_loss.png",
    ]
    from PIL import Image

    for name in ("loss.png", "ceval_categories.png"):
        with Image.open(os.path.join(root, "metrics", name)) as image:
            assert image.format == "PNG" and image.width >= 600
            assert len(image.convert("RGB").getcolors(1 << 16) or [None] * 99) > 20  # drawn, not blank
    # The picture is of the logged run: drawn again from metrics/train_log.tsv, the same bytes.
    from glm3.pipeline import plots as drawing

    again = drawing.loss_curve(os.path.join(root, "metrics", "train_log.tsv"), os.path.join(root, "again.png"))
    with open(again, "rb") as a, open(os.path.join(root, "metrics", "loss.png"), "rb") as b:
        assert a.read() == b.read()
    os.unlink(again)
    with open(os.path.join(root, "metrics", "train_log.tsv"), encoding="utf-8") as f:
        assert [int(line.split("\t")[0]) for line in f.read().splitlines()[1:]] == list(range(1, 31))


def test_outputs_are_read_only_links_into_the_cache_not_copies(project):
    root = project[0]
    cache = os.path.join(root, ".dvc", "cache")
    weights = glob.glob(os.path.join(root, "models", "ms", "mindspore_model*.ckpt"))
    assert weights
    for path in weights:
        st = os.stat(path)
        assert st.st_nlink >= 2, f"{path} is a copy, not a link into the DVC cache"
        assert not st.st_mode & 0o222, f"{path} is writable: an in-place edit would corrupt the cache"
    inodes = {os.stat(os.path.join(d, f)).st_ino for d, _, files in os.walk(cache) for f in files}
    assert all(os.stat(p).st_ino in inodes for p in weights)


def test_a_change_to_one_stages_code_reruns_that_stage_and_what_follows_only(project):
    root = project[0]
    path = os.path.join(root, "src", "glm3", "deploy", "export.py")
    assert os.path.isfile(path)  # appending to a missing file would create an unrelated one
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n# an edit to the export code\n")
    status = json.loads(dvc("status", "--json", cwd=root).stdout)
    assert set(status) == {"export", "evaluate"}  # the two stages whose code includes glm3/deploy/export.py
    out = dvc("repro", cwd=root).stdout
    assert ran(out) == ["export", "evaluate"]  # never download, convert, finetune, merge or adgen_eval
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"


def test_lr_change_reruns_finetune_onward_and_an_interrupted_finetune_leaves_nothing(project):
    root = project[0]
    set_param(root, "finetune", "lr", "3.0e-3")
    set_param(root, "finetune", "steps", 300)  # long enough (several seconds) to be caught mid-run
    status = json.loads(dvc("status", "--json", cwd=root).stdout)
    assert set(status) == {"finetune"}  # only finetune's own params changed; the rest follows from its outputs

    # Kill `dvc repro` while finetune trains, once it has saved a checkpoint (every 10 steps).
    work = os.path.join(root, "models", ".work")
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [d for d in os.listdir(work) if d.startswith("finetune-")] if os.path.isdir(work) else []
        if any(glob.glob(os.path.join(work, r, "checkpoint", "rank_0", "step_*")) for r in runs):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finetune finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for path in ("models/finetune", "metrics/finetune.json", "metrics/train_log.tsv"):
        assert not os.path.exists(os.path.join(root, path)), path  # removed by DVC, never half rewritten
    leftovers = [e for e in os.listdir(os.path.join(root, "models")) if e.startswith(".finetune")]
    assert leftovers == []
    assert "finetune" in json.loads(dvc("status", "--json", cwd=root).stdout)

    out = dvc("repro", cwd=root)
    assert ran(out.stdout) == ["finetune", "merge", "export", "evaluate", "adgen_eval"]
    assert "resuming the interrupted run from step" in out.stderr
    with open(os.path.join(root, "dvc.lock"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["stages"]["finetune"]["params"]["params.yaml"]["finetune"]["lr"] == 3.0e-3
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"
    assert not [d for d in os.listdir(work) if d.startswith("finetune-")]  # published, work dir gone


def test_experiment_run_with_a_set_param(project):
    root = project[0]
    out = dvc("exp", "run", "-S", "finetune.lr=1.5e-3", "-S", "finetune.steps=30", "-n", "lr-1.5e-3", cwd=root)
    assert ran(out.stdout) == ["finetune", "merge", "export", "evaluate", "adgen_eval"]
    shown = json.loads(dvc("exp", "show", "--json", cwd=root).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e.get("name") for e in experiments}
    assert "lr-1.5e-3" in names
    exp = next(e for e in experiments if e.get("name") == "lr-1.5e-3")["revs"][0]["data"]
    assert exp["params"]["params.yaml"]["data"]["finetune"]["lr"] == 1.5e-3
    assert exp["metrics"]["metrics/finetune.json"]["data"]["steps"] == 30


def test_push_then_pull_restores_the_outputs_from_the_local_remote(project):
    root = project[0]
    dvc("push", cwd=root)
    assert os.listdir(os.path.join(root, ".dvc-storage"))
    for path in DVC_OUTPUTS.values():
        shutil.rmtree(os.path.join(root, path))
    shutil.rmtree(os.path.join(root, ".dvc", "cache"))
    dvc("pull", cwd=root)
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"
    assert os.path.isfile(os.path.join(root, "models", "export", "decode.mindir"))
