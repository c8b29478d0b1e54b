import json

import pytest

from glm3 import PRESETS, ConfigError, GLM3Config

RELEASED = {  # the released THUDM/chatglm3-6b config.json, as published
    "_name_or_path": "THUDM/chatglm3-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.30.2",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def test_released_config_round_trip(tmp_path):
    cfg = GLM3Config.from_hf(RELEASED)
    assert cfg == GLM3Config.from_name("glm3_6b")
    assert cfg.qkv_size == 4608 and cfg.num_kv_groups == 2 and cfg.rotary_dim == 64
    out = cfg.to_hf()
    for key, value in RELEASED.items():
        assert out[key] == value, key
    cfg.save(tmp_path)
    assert GLM3Config.from_hf(tmp_path) == cfg
    assert json.loads((tmp_path / "config.json").read_text())["_name_or_path"] == "THUDM/chatglm3-6b"


def test_presets():
    assert set(PRESETS) >= {"glm3_6b", "glm3_6b_32k", "tiny", "bench"}
    long = GLM3Config.from_name("glm3_6b_32k")
    assert long.rope_ratio == 50 and long.seq_length == 32768 and long.rope_base == 500000.0
    bench = GLM3Config.from_name("bench")
    assert (
        bench.num_layers,
        bench.hidden_size,
        bench.num_attention_heads,
        bench.kv_channels,
        bench.multi_query_group_num,
        bench.ffn_hidden_size,
        bench.padded_vocab_size,
    ) == (4, 1024, 16, 64, 2, 2816, 65024)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        GLM3Config.from_name("nope")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 30, "multi_query_group_num": 4}, "divisible by multi_query_group_num"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"kv_channels": 6}, "multiple of 4"),
        ({"rmsnorm": False}, "rmsnorm=false"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"eos_token_id": 70000}, "eos_token_id"),
        ({"rope_ratio": 0}, "rope_ratio"),
    ],
)
def test_validation_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        GLM3Config.from_hf({**RELEASED, **change})


def test_from_hf_rejects_other_models(tmp_path):
    with pytest.raises(ConfigError, match="not a ChatGLM config"):
        GLM3Config.from_hf({"model_type": "llama"})
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GLM3Config.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        GLM3Config.from_hf(tmp_path / "missing")


def test_mha_without_groups():
    cfg = GLM3Config.from_hf({**RELEASED, "multi_query_attention": False, "num_attention_heads": 30})
    assert cfg.num_kv_groups == 30 and cfg.qkv_size == 3 * 30 * 128
