import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import glm3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "adgen_sample.json")  # the shipped ADGEN-format sample (24 records)
# The 1,070 real ADGEN records, beside the repo; override with GLM3_ADGEN_DEV.
ADGEN_DEV = os.environ.get("GLM3_ADGEN_DEV", os.path.join(REPO, "..", "shared", "data", "AdvertiseGen", "dev.json"))

ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)

# A config whose attention width differs from hidden_size and whose groups are not 2.
ODD_CONFIG = {
    "num_layers": 2,
    "hidden_size": 48,
    "ffn_hidden_size": 72,
    "num_attention_heads": 8,
    "kv_channels": 8,
    "multi_query_group_num": 4,
    "padded_vocab_size": 1536,
    "seq_length": 256,
    "torch_dtype": "float32",
}


def free_port() -> int:
    """A free TCP port for a program that needs one named (msrun's master, the Prefect server): below the
    kernel's ephemeral range, which it hands to port-0 binds and outgoing connections, so nothing else on the
    host is given it between this check and the program's bind. Servers of ours take --port 0 instead."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


_SERVERS = itertools.count()


class Server:
    """`glm3 serve` in a subprocess on a port the kernel picks (--port 0: nothing to race for), read from the
    line the server prints; ready once /health answers."""

    def __init__(self, model, cwd, *flags, key=None):
        import openai

        self.log = open(os.path.join(cwd, f"serve-{os.getpid()}-{next(_SERVERS)}.log"), "w+")
        env = subprocess_env(**({"GLM3_API_KEY": key} if key else {}))
        command = [sys.executable, "-m", "glm3.cli", "serve", "--model", str(model), "--port", "0", *flags]
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        self.url = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            if self.url is None:
                found = re.search(r" at (http://127\.0\.0\.1:\d+)/v1", self.output())
                self.url = found and found.group(1)
            else:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"server did not come up:\n{self.output()}")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stats(self) -> dict:
        return httpx.get(self.url + "/v1/stats", headers=self.headers, timeout=10).json()

    def post(self, path, body=None, content=None, headers=None):
        return httpx.post(
            self.url + path, json=body, content=content, headers={**self.headers, **(headers or {})}, timeout=120
        )

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code

    def wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats["running"] == stats["waiting"] == stats["swapped"] == 0:
                return stats
            time.sleep(0.1)
        raise AssertionError(f"the engine did not go idle: {self.stats()}")


def subprocess_env(**extra) -> dict:
    """The environment for real subprocesses: this venv's bin first (glm3, dvc, prefect, msrun), quiet MindSpore."""
    e = dict(os.environ, GLOG_v="3", **extra)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e["PATH"]
    return e


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "glm3 tests",
    "GIT_AUTHOR_EMAIL": "tests@glm3.invalid",
    "GIT_COMMITTER_NAME": "glm3 tests",
    "GIT_COMMITTER_EMAIL": "tests@glm3.invalid",
}


def project_clone(dst) -> str:
    """A fresh git repository holding the project's tracked and new (not ignored) files as they are now,
    committed: what a clean clone of this working tree would be, without models/, caches or the venv."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    env = subprocess_env(**GIT_IDENTITY)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "clone"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True)
    return os.fspath(dst)


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    # MindSpore writes compile diagnostics into the working directory: keep them out of the repo.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset in HuggingFace layout, safetensors shards + index."""
    return glm3.write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def odd_bin_dir(tmp_path_factory):
    """An unusual shape in HuggingFace layout, pytorch_model-*.bin shards + index."""
    cfg = glm3.GLM3Config(**ODD_CONFIG)
    return glm3.write_synthetic_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "odd", cfg, seed=2, fmt="bin", num_shards=3
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return glm3.load_model(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return glm3.load_tokenizer(tiny_dir)


class StepDriver:
    """generate()'s model runner and KV-cache manager driven by hand: start(ids, mask) prefills a left-padded
    batch, step(tokens) decodes the given tokens (not sampled ones); both return the next-token logits [b, V]."""

    def __init__(self, model, batch: int, max_len: int):
        from glm3.runtime.generation import generation_engine

        engine = generation_engine(model, batch, max_len)
        self.runner, self.kv, self.batch = engine.runner, engine.scheduler.kv, batch

    def start(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
        for row, prompt in enumerate(self.prompts):
            self.kv.allocate(row, len(prompt))
        self.steps = 0
        return self.runner.prefill(self.prompts, [self.kv.tables[row] for row in range(self.batch)])

    def step(self, tokens) -> np.ndarray:
        for row in range(self.batch):
            self.kv.append_slots(row)
        positions = [len(p) + self.steps for p in self.prompts]
        self.steps += 1
        return self.runner.decode(list(tokens), positions, [self.kv.tables[row] for row in range(self.batch)])


def paged_decode_logits(model, steps: int = 24, seed: int = 0) -> np.ndarray:
    """[steps + 1, 2, V] logits of a left-padded batch of two rows (prefill, then one token a step, past the first
    cache block) through generate()'s model runner."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 2000, size=(2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :13] = 0  # the second row is shorter: left padding
    driver = StepDriver(model, batch=2, max_len=128)
    logits = [driver.start(ids, mask)]
    logits += [driver.step(t) for t in rng.integers(3, 2000, size=(steps, 2))]
    return np.stack(logits)


def without_layer_kernel(model):
    """The model decoding operator by operator (each block's CPU kernels apart) instead of one kernel a block."""
    for layer in model.transformer.encoder.layers:
        layer.decode_kernel = None
    model.structure_changed()
    return model


def hf_weights(directory):
    """Read a HF-layout checkpoint with torch/safetensors directly (not through glm3)."""
    import torch
    from safetensors.torch import load_file

    weights = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            weights.update(load_file(path))
        elif name.endswith(".bin"):
            weights.update(torch.load(path, weights_only=True))
    return weights


def ckpt_arrays(path):
    """{name: numpy array} of a MindSpore .ckpt, read with MindSpore itself."""
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def hf_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def write_scripted_model(tiny_dir, script, directory):
    """The tiny ChatGLM3 with weights set so that it writes a chosen text: every block's output projections are
    zero (each position keeps its own embedding), and the output layer maps each token of `script` to the next
    one (so each token may appear once). A real model and real decoding, with a known output: after
    script[0] (e.g. <|assistant|>, the end of every chat prompt) it writes script[1:]. Returns `directory`."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    assert len(set(script)) == len(script) and 0 not in script  # every step has one successor
    weights = {}
    for name in sorted(os.listdir(tiny_dir)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(tiny_dir, name)))
    for name in weights:
        if name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            weights[name] = np.zeros_like(weights[name])
    weights["transformer.encoder.final_layernorm.weight"][:] = 1.0
    embedding = weights["transformer.embedding.word_embeddings.weight"]
    output = np.zeros_like(weights["transformer.output_layer.weight"])
    for token, successor in zip(script, script[1:]):
        row = embedding[token] / np.sqrt(np.mean(embedding[token] ** 2))  # what the final RMSNorm gives
        output[successor] = 10.0 * row / np.linalg.norm(row)
    weights["transformer.output_layer.weight"] = output
    os.makedirs(directory, exist_ok=True)
    save_file(weights, os.path.join(str(directory), "model.safetensors"))
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_dir, name), os.path.join(str(directory), name))
    return str(directory)


PENALTY = 1.8
PENALTY_TOKENS = 24


def penalised(logits: np.ndarray, seen) -> np.ndarray:
    """The repetition penalty as HuggingFace states it (see tests/test_repetition_penalty.py)."""
    out = logits.astype(np.float64).copy()
    for token in set(seen):
        out[token] = out[token] * PENALTY if out[token] < 0 else out[token] / PENALTY
    return out


def penalised_reference(model, prompt, history_of_generated=True) -> list[int]:
    out: list[int] = []
    for _ in range(PENALTY_TOKENS):
        logits = model(Tensor([prompt + out], ms.int32)).asnumpy()[0, -1]
        out.append(int(np.argmax(penalised(logits, prompt + (out if history_of_generated else [])))))
    return out


def follows_the_penalty_rule(model, prompt, served) -> None:
    """Each served token is the penalised reference's best (within float noise of it: no near-tie fails)."""
    assert len(served) == PENALTY_TOKENS
    for k, token in enumerate(served):
        logits = model(Tensor([prompt + served[:k]], ms.int32)).asnumpy()[0, -1]
        scores = penalised(logits, prompt + served[:k])
        assert scores[token] >= scores.max() - 1e-4, (k, token, int(scores.argmax()))
