"""The pipeline library: params, dvc.yaml against the stage table, the rank_table stage, keyed layouts for
Prefect, the finetune config a stage builds, and `glm3 stage` errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, subprocess_env
from glm3.io import exclusive_lock
from glm3.pipeline import Layout, ParamsError, load_params
from glm3.pipeline.code_deps import stage_code
from glm3.pipeline.dvc_yaml import render as render_dvc_yaml
from glm3.pipeline.flow_support import RUNS, metrics_markdown, overrides_from
from glm3.pipeline.layout import DVC_OUTPUTS
from glm3.pipeline.params import apply_overrides, check_params
from glm3.pipeline.plan import PLAN_FILE, RANK_TABLE_FILE, parallel_config
from glm3.pipeline.stages import ORDER, STAGES, stage_function
from glm3.pipeline.stages.finetune import finetune_config
from glm3.train.rank_table import load_rank_table

rank_table = stage_function("rank_table")
PARAMS = os.path.join(REPO, "params.yaml")


def test_params_load_and_dotted_overrides():
    params = load_params(PARAMS, {"finetune.lr": 1e-3, "finetune.lora.enabled": True, "export.batch_size": None})
    assert params["finetune"]["lr"] == 1e-3 and params["finetune"]["lora"]["enabled"] is True
    assert params["export"]["batch_size"] is None  # null is a value too (a dynamic batch)
    assert load_params(PARAMS)["finetune"]["lora"]["enabled"] is False  # the file itself is untouched
    with pytest.raises(ParamsError, match=r"unknown parameter 'finetune.lrr'.*\blr\b"):
        apply_overrides(params, {"finetune.lrr": 1})
    with pytest.raises(ParamsError, match="no section 'finetunes'"):
        apply_overrides(params, {"finetunes.lr": 1})


def test_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("download: {}\nconvert: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("download: {}\nconvert: {}\n")
    with pytest.raises(ParamsError, match="lacks the section.*parallel, finetune"):
        load_params(tmp_path / "params.yaml")


def test_dvc_yaml_declares_what_the_stage_table_says():
    with open(os.path.join(REPO, "dvc.yaml"), encoding="utf-8") as f:
        dvc = yaml.safe_load(f)["stages"]
    assert list(dvc) == list(ORDER)
    with open(os.path.join(REPO, "dvc.yaml"), encoding="utf-8") as f:
        assert f.read() == render_dvc_yaml(REPO), "dvc.yaml is stale: run python -m glm3.pipeline.dvc_yaml"
    for name, entry in STAGES.items():
        sections, upstream, data_keys = entry.sections, entry.upstream, entry.data_keys
        stage = dvc[name]
        assert stage["cmd"] == f"python -m stages.{name}"
        assert os.path.isfile(os.path.join(REPO, "stages", f"{name}.py"))
        assert stage["params"] == list(sections), name
        assert stage["outs"][0] == DVC_OUTPUTS[name], name
        for extra in stage["outs"][1:]:  # the data behind a plot, tracked by DVC and committed to git
            [(path, options)] = extra.items()
            assert path.startswith("metrics/") and options == {"cache": False}, (name, extra)
        deps = stage["deps"]
        # Exactly the stage's own code (what its imports reach), then its inputs: no more, no less.
        code = [d for d in deps if d.startswith(("src/", "stages/"))]
        assert code == stage_code(name, REPO), name
        assert f"src/glm3/pipeline/stages/{name}.py" in code and "src/glm3/pipeline/layout.py" in code
        assert all(DVC_OUTPUTS[u] in deps for u in upstream), name
        assert all("${" + key + "}" in deps for key in data_keys), name
        for dep in deps:  # code and data in the repository, another stage's output, or a params.yaml path
            assert os.path.exists(os.path.join(REPO, dep)) or dep in DVC_OUTPUTS.values() or dep.startswith("${"), dep
    assert list(dvc["finetune"]["metrics"][0]) == ["metrics/finetune.json"]
    # Plots are images (no Vega-Lite spec, whose page needs a script from the internet).
    assert dvc["finetune"]["plots"] == [{"metrics/loss.png": {"cache": False}}]
    assert dvc["evaluate"]["plots"] == [{"metrics/ceval_categories.png": {"cache": False}}]


SERVERS = [
    {"ip": "192.168.1.10", "devices": "[0,2)", "device_ips": ["10.0.0.1", "10.0.0.2"]},
    {"ip": "192.168.1.11", "devices": "[0,2)", "hccn_conf": "HCCN"},
]


def _params_with(servers, **parallel):
    params = load_params(PARAMS)
    params["parallel"].update(servers=servers, **parallel)
    return params


def test_rank_table_stage_builds_the_hccl_table_and_the_launch_plan(tmp_path):
    hccn = tmp_path / "hccn.conf"
    hccn.write_text("address_0=10.0.1.1\nnetmask_0=255.255.255.0\naddress_1=10.0.1.2\nnetmask_1=255.255.255.0\n")
    servers = [SERVERS[0], dict(SERVERS[1], hccn_conf=str(hccn))]
    params = _params_with(servers, device="Ascend", data_parallel=2, model_parallel=2, node_rank=1)
    layout = Layout.dvc(tmp_path)
    assert rank_table(params, layout) == {"world_size": 4, "nodes": 2}

    out = layout.outputs["rank_table"]
    table = load_rank_table(os.path.join(out, RANK_TABLE_FILE))
    assert [s["server_id"] for s in table["server_list"]] == ["192.168.1.10", "192.168.1.11"]
    assert [d["device_ip"] for s in table["server_list"] for d in s["device"]] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.1.1",
        "10.0.1.2",
    ]
    assert [d["rank_id"] for s in table["server_list"] for d in s["device"]] == ["0", "1", "2", "3"]
    with open(os.path.join(out, PLAN_FILE), encoding="utf-8") as f:
        plan = json.load(f)
    assert plan["nodes"] == [
        {"ip": "192.168.1.10", "local_workers": 2, "node_rank": 0},
        {"ip": "192.168.1.11", "local_workers": 2, "node_rank": 1},
    ]

    # What finetune launches on this host (node 1): msrun over all 4 ranks, 2 here, master on node 0.
    parallel = parallel_config(params, out)
    assert (parallel.worker_num, parallel.local_worker_num, parallel.node_rank) == (4, 2, 1)
    assert parallel.master_addr == "192.168.1.10"
    assert parallel.rank_table_file == os.path.join(out, RANK_TABLE_FILE)


def test_rank_table_stage_refuses_a_mismatch_and_leaves_the_previous_output(tmp_path):
    layout = Layout.dvc(tmp_path)
    rank_table(load_params(PARAMS), layout)  # the default: one local process, no rank table
    with open(os.path.join(layout.outputs["rank_table"], PLAN_FILE), encoding="utf-8") as f:
        before = f.read()
    assert json.loads(before)["rank_table"] is None

    params = _params_with(SERVERS[:1], device="Ascend", data_parallel=8)
    with pytest.raises(ValueError, match="servers have 2 devices but .* is 8"):
        rank_table(params, layout)
    with pytest.raises(ParamsError, match=r"servers\[0\] must hold ip"):  # checked with the params, first
        check_params(_params_with([{"address": "x"}], device="Ascend"), "params.yaml")
    with pytest.raises(ValueError, match="model/pipeline parallelism .* need Ascend or GPU"):
        rank_table(_params_with([], model_parallel=2), layout)
    with open(os.path.join(layout.outputs["rank_table"], PLAN_FILE), encoding="utf-8") as f:
        assert f.read() == before
    assert sorted(os.listdir(os.path.dirname(layout.outputs["rank_table"]))) == ["rank_table"]  # no temporaries


@pytest.fixture()
def project(tmp_path):
    """A project directory with params, data, and stand-ins for the outputs DVC would have made."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    shutil.copytree(os.path.join(REPO, "data"), tmp_path / "data")
    for stage in ("convert", "rank_table"):
        os.makedirs(tmp_path / DVC_OUTPUTS[stage])
        (tmp_path / DVC_OUTPUTS[stage] / "file").write_text(stage)
    return tmp_path


def test_keyed_layout_changes_exactly_the_affected_stages(project):
    params = load_params(project / "params.yaml")
    stages = RUNS["finetune"]
    base = Layout.keyed(project, params, stages)
    assert base.outputs["convert"] == str(project / "models" / "ms")  # read from the DVC layout
    assert all(base.outputs[s].startswith(str(project / "models" / "prefect" / f"{s}-")) for s in stages)
    assert Layout.keyed(project, params, stages) == base  # deterministic

    def changed(**overrides):
        other = Layout.keyed(project, apply_overrides(params, overrides), stages)
        return {s for s in stages if other.outputs[s] != base.outputs[s]}

    assert changed(**{"finetune.lr": 1e-3}) == {"finetune", "merge", "export", "evaluate", "adgen_eval"}
    assert changed(**{"evaluate.shots": 2}) == {"evaluate"}
    assert changed(**{"export.paged": False}) == {"export", "evaluate"}
    assert changed(**{"parallel.master_port": 9000}) == {
        "rank_table",
        "finetune",
        "merge",
        "export",
        "evaluate",
        "adgen_eval",
    }

    with open(project / "data" / "adgen_sample.json", "a", encoding="utf-8") as f:
        f.write("\n")  # the training data changed
    assert {s for s in stages if Layout.keyed(project, params, stages).outputs[s] != base.outputs[s]} == {
        "finetune",
        "merge",
        "export",
        "evaluate",
        "adgen_eval",
    }
    (project / DVC_OUTPUTS["convert"] / "file").write_text("another model")
    assert Layout.keyed(project, params, stages).outputs["rank_table"] == base.outputs["rank_table"]
    assert Layout.keyed(project, params, stages).outputs["finetune"] != base.outputs["finetune"]

    shutil.rmtree(project / DVC_OUTPUTS["convert"])
    with pytest.raises(FileNotFoundError, match="models/ms does not exist.*dvc repro"):
        Layout.keyed(project, params, stages)
    with pytest.raises(ValueError, match="unknown stage"):
        Layout.keyed(project, params, ["train"])


def test_finetune_stage_config_from_params(project):
    layout = Layout.dvc(project)
    rank_table(load_params(project / "params.yaml"), layout)
    params = load_params(project / "params.yaml", {"finetune.lr": 5e-4})
    config = finetune_config(params, layout)
    assert (config.model, config.data) == (layout.outputs["convert"], str(project / "data" / "adgen_sample.json"))
    assert config.lr == 5e-4 and config.lora is None and config.resume == "auto"
    assert config.output == os.path.join(layout.work, f"finetune-{config.fingerprint()}")
    assert config.cache_dir == os.path.join(layout.work, "data_cache")  # shared by runs with other settings
    lora = finetune_config(apply_overrides(params, {"finetune.lora.enabled": True, "finetune.lora.rank": 4}), layout)
    assert lora.lora.rank == 4 and lora.lora.targets == ("query_key_value",)
    assert lora.output != config.output


def test_flow_overrides_and_metrics_artifact(project):
    assert overrides_from({"export.paged": True}, lr=1e-3, steps=None, lora=True) == {
        "export.paged": True,
        "finetune.lr": 1e-3,
        "finetune.lora.enabled": True,
    }
    layout = Layout.dvc(project)
    text = metrics_markdown(
        "finetune",
        {
            "finetune": {"steps": 6, "final_loss": 5.123456, "mode": "full"},
            "evaluate": {"average": 25.0, "categories": {"STEM": 50.0, "Other": 0.0}},
        },
        layout,
    )
    assert "| finetune | `models/finetune` | steps=6, final_loss=5.123, mode=full |" in text
    assert "| STEM | 50.0 |" in text and "| Other | 0.0 |" in text


def test_a_work_directory_is_locked_while_a_stage_trains_in_it(tmp_path):
    lock = tmp_path / "work" / "finetune-abc.lock"
    with exclusive_lock(lock, "the work directory"):
        with pytest.raises(FileExistsError, match="the work directory is in use by another process"):
            with exclusive_lock(lock, "the work directory"):
                pass
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from glm3.io import exclusive_lock\nwith exclusive_lock({str(lock)!r}, 'it'): pass",
            ],
            capture_output=True,
            text=True,
        )
        assert holder.returncode == 1 and "FileExistsError: it is in use" in holder.stderr
    with exclusive_lock(lock, "the work directory"):  # released when its holder is done
        pass


def test_an_interrupted_finetune_stage_publishes_nothing_and_resumes(project):
    """SIGTERM (as from Ctrl-C on `dvc repro`): a checkpoint, exit 130, no output; the re-run resumes."""
    shutil.rmtree(project / "models")
    stage = [sys.executable, "-m", "glm3.cli", "stage"]
    for name in ("download", "convert", "rank_table"):
        subprocess.run(
            [*stage, name, "--project", str(project)],
            env=subprocess_env(),
            check=True,
            capture_output=True,
            timeout=300,
        )
    cmd = [*stage, "finetune", "--project", str(project), "-S", "finetune.steps=200"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = project / "models" / ".work"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list(work.glob("finetune-*/checkpoint/rank_0/step_*")):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 300 s:\n" + proc.communicate()[1][-2000:])
        time.sleep(0.05)
    assert proc.poll() is None, "finetune finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in err and "run the stage again to resume" in err
    assert not (project / "models" / "finetune").exists() and not (project / "metrics").exists()

    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming the interrupted run from step" in rerun.stderr
    with open(project / "metrics" / "finetune.json", encoding="utf-8") as f:
        assert json.load(f)["steps"] == 200
    assert (project / "models" / "finetune" / "model" / "config.json").is_file()
    assert not list(work.glob("finetune-*"))  # published: the work directory and its lock are gone


def test_glm3_stage_reports_bad_parameters(tmp_path):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    run = [sys.executable, "-m", "glm3.cli", "stage"]
    proc = subprocess.run(
        [*run, "rank_table", "--project", str(tmp_path), "-S", "parallel.data_paralel=2"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and "unknown parameter 'parallel.data_paralel'" in proc.stderr
    proc = subprocess.run(
        [*run, "download", "--project", str(tmp_path), "-S", "download.source=ftp"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and "download.source must be 'synthetic' or 'hub'" in proc.stderr
    assert not os.path.exists(tmp_path / "models")


def test_params_refuse_unknown_keys_everywhere(tmp_path):
    text = open(PARAMS, encoding="utf-8").read()
    server = "\n  servers:\n    - {ip: 10.0.0.1, devices: '[0,8)', hccn: /etc/hccn.conf}\n"
    cases = {  # one typo each, written as a user would
        r"unknown section\(s\) finetuning; the sections are download, convert": text.replace(
            "\nfinetune:", "\nfinetuning:"
        ),
        # LoRA is disabled in the file: still refused
        r"unknown setting\(s\) finetune.lora.rnak; finetune.lora takes alpha, dropout, enabled, rank": text.replace(
            "    rank: 8", "    rnak: 8"
        ),
        r"unknown setting\(s\) export.pagd; export takes .*paged": text.replace("  paged: true", "  pagd: true"),
        r"parallel.servers\[0\] must hold ip and devices": re.sub(r"\n  servers: \[\][^\n]*\n", server, text),
    }
    for message, changed in cases.items():
        assert changed != text
        (tmp_path / "params.yaml").write_text(changed, encoding="utf-8")
        with pytest.raises(ParamsError, match=message):
            load_params(tmp_path / "params.yaml")
    # A setting the file leaves at its default can be set, as the error for a bad data line advises.
    params = load_params(PARAMS, {"finetune.skip_bad_lines": True, "finetune.lora.rank": 4})
    assert params["finetune"]["skip_bad_lines"] is True and params["finetune"]["lora"]["rank"] == 4


# Stands in for MindSpore on the path of a stage that must fail before it imports MindSpore.
NO_MINDSPORE = 'raise ImportError("MindSpore was imported before the params were checked")\n'


def test_bad_finetune_params_fail_before_mindspore_and_leave_nothing(tmp_path):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    shutil.copytree(os.path.join(REPO, "data"), tmp_path / "data")
    run = [sys.executable, "-m", "glm3.cli", "stage"]
    done = subprocess.run(
        [*run, "rank_table", "--project", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "fake" / "mindspore").mkdir(parents=True)
    (tmp_path / "fake" / "mindspore" / "__init__.py").write_text(NO_MINDSPORE)
    env = subprocess_env(PYTHONPATH=str(tmp_path / "fake"))
    for overrides, message in (
        (
            ["finetune.seq_length=128"],
            "seq_length (128) must equal max_source_length + max_target_length + 1 = 32 + 32 + 1 = 65",
        ),
        (["finetune.warmup_steps=40"], "warmup_steps must be in [0, steps=30], got 40"),
        (["finetune.lora.enabled=true", "finetune.lora.rank=0"], "LoRA rank must be >= 1"),
    ):
        sets = [arg for override in overrides for arg in ("-S", override)]
        done = subprocess.run(
            [*run, "finetune", "--project", str(tmp_path), *sets], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 2 and message in done.stderr, (overrides, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "MindSpore was imported" not in done.stderr
    assert sorted(os.listdir(tmp_path / "models")) == ["rank_table"]  # no work directory, no lock file
