import json
import os

import mindspore as ms
import pytest

import glm3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "adgen_sample.json")  # the shipped ADGEN-format sample (24 records)
# The 1,070 real ADGEN records, beside the repo; override with GLM3_ADGEN_DEV.
ADGEN_DEV = os.environ.get("GLM3_ADGEN_DEV", os.path.join(REPO, "..", "shared", "data", "AdvertiseGen", "dev.json"))

ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)

# A config whose attention width differs from hidden_size and whose groups are not 2.
ODD_CONFIG = {"num_layers": 2, "hidden_size": 48, "ffn_hidden_size": 72, "num_attention_heads": 8,
              "kv_channels": 8, "multi_query_group_num": 4, "padded_vocab_size": 1536, "seq_length": 256,
              "torch_dtype": "float32"}


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
    return glm3.write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "odd", cfg, seed=2, fmt="bin",
                                           num_shards=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return glm3.load_model(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return glm3.load_tokenizer(tiny_dir)


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
