"""Hub downloads through the real huggingface_hub client against a local Hub-protocol server (tests/hub_server.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import glm3
from glm3.weights.download import DownloadError, download_from_hub, select_files
from hub_server import FakeHub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "THUDM/chatglm3-6b"


@pytest.fixture
def hub(tiny_dir, monkeypatch):
    with FakeHub(token="hf_test_token") as server:
        server.add_repo(REPO, tiny_dir, COMMIT)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def test_download_verifies_records_and_loads(hub, tiny_dir, tmp_path):
    summary = download_from_hub(tmp_path / "m", cache_dir=str(tmp_path / "cache"), progress=False)
    assert summary.commit == COMMIT and "not pinned" in summary.describe()
    files = sorted(os.listdir(tmp_path / "m"))
    assert files == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "source.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    record = json.load(open(tmp_path / "m" / "source.json"))
    assert record["commit"] == COMMIT and record["revision"] == "main"
    for name, sha in record["files"].items():
        if name.endswith(".safetensors"):
            assert sha == hub.repos[REPO].files[name]["sha256"]
    for name in files:
        if name != "source.json":
            assert open(tmp_path / "m" / name, "rb").read() == open(os.path.join(tiny_dir, name), "rb").read()
    # Pinned to the commit it resolved: the file requests name the commit, not the branch.
    assert all(f"/resolve/{COMMIT}/" in p for m, p, _ in hub.requests if "/resolve/" in p)
    ids = [[1501, 1503, 5, 6]]
    import mindspore as ms

    a = glm3.load_model(tmp_path / "m", kernels_backend="plain")(ms.Tensor(ids, ms.int32)).asnumpy()
    b = glm3.load_model(tiny_dir, kernels_backend="plain")(ms.Tensor(ids, ms.int32)).asnumpy()
    np.testing.assert_array_equal(a, b)


def test_interrupted_transfer_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The client writes (and can resume from) whole chunks: use chunks smaller than the cut-off half file.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut_once.add("model-00002-of-00002.safetensors")
    download_from_hub(tmp_path / "m", revision=COMMIT, cache_dir=str(tmp_path / "cache"), progress=False)
    ranged = [
        h for m, p, h in hub.requests if m == "GET" and p.endswith("model-00002-of-00002.safetensors") and "Range" in h
    ]
    assert ranged and ranged[0]["Range"] != "bytes=0-"
    assert json.load(open(tmp_path / "m" / "source.json"))["revision"] == COMMIT


def test_checksum_mismatch_is_refused_and_nothing_is_published(hub, tmp_path):
    hub.corrupt.add("model-00001-of-00002.safetensors")
    with pytest.raises(DownloadError, match="model-00001-of-00002.safetensors .* failed verification: sha256"):
        download_from_hub(tmp_path / "m", cache_dir=str(tmp_path / "cache"), progress=False)
    assert not [e for e in os.listdir(tmp_path) if e == "m" or e.startswith(".m.")]
    hub.corrupt.clear()  # the fault is gone: the same command now succeeds (the bad copy was not kept)
    summary = download_from_hub(tmp_path / "m", cache_dir=str(tmp_path / "cache"), progress=False)
    assert (
        summary.files["model-00001-of-00002.safetensors"]
        == hub.repos[REPO].files["model-00001-of-00002.safetensors"]["sha256"]
    )


def test_private_repo_needs_hf_token(hub, tiny_dir, tmp_path, monkeypatch):
    hub.add_repo("org/private-glm3", tiny_dir, COMMIT, private=True)
    with pytest.raises(DownloadError, match="not found .*HF_TOKEN"):
        download_from_hub(tmp_path / "m", repo_id="org/private-glm3", cache_dir=str(tmp_path / "c"), progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    download_from_hub(tmp_path / "m", repo_id="org/private-glm3", cache_dir=str(tmp_path / "c"), progress=False)
    assert any(
        {k.lower(): v for k, v in h.items()}.get("authorization") == "Bearer hf_test_token" for _, _, h in hub.requests
    )


def test_unknown_revision_and_offline_cache(hub, tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="revision 'v9' not found"):
        download_from_hub(tmp_path / "m", revision="v9", cache_dir=str(tmp_path / "cache"), progress=False)
    download_from_hub(tmp_path / "m", revision=COMMIT, cache_dir=str(tmp_path / "cache"), progress=False)
    # Offline afterwards: the same commit comes from the cache, checked against the cache's blob names.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    summary = download_from_hub(tmp_path / "again", revision=COMMIT, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(hub.requests) == before and summary.commit == COMMIT
    assert (
        summary.files["model-00001-of-00002.safetensors"]
        == hub.repos[REPO].files["model-00001-of-00002.safetensors"]["sha256"]
    )
    with pytest.raises(DownloadError, match="not .*in the HuggingFace cache"):
        download_from_hub(tmp_path / "x", repo_id="other/repo", cache_dir=str(tmp_path / "cache"), progress=False)


def test_no_network_fails_fast_naming_the_offline_alternative(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "glm3.cli", "download", "--dst", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot reach" in result.stderr and "glm3 download --synthetic tiny" in result.stderr
    assert not os.path.exists(tmp_path / "m")  # (the subprocess timeout bounds how long it may try)


def test_select_files_prefers_one_weight_format():
    names = [
        "config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "README.md",
        "modeling_chatglm.py",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert select_files(names) == sorted(names[:3] + names[8:])
    assert select_files(names, prefer="bin") == sorted(names[:3] + names[5:8])
    assert select_files(names[:8]) == sorted(names[:3] + names[5:8])  # falls back to what exists
    with pytest.raises(DownloadError, match="no model weights"):
        select_files(names[:5])
