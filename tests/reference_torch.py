"""An independent PyTorch reference of ChatGLM3's forward pass, written from the architecture facts only
(it shares no code with glm3): float64 math over HuggingFace-named weights."""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, base):
    # x: [s, heads, d]; rotate the first d/2 channels in adjacent pairs.
    d = x.shape[-1]
    rot = d // 2
    theta = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = positions[:, None].double() * theta[None, :]  # [s, rot/2]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    out = torch.empty_like(x_rot)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return torch.cat([out, x_pass], -1)


def forward(weights: dict[str, torch.Tensor], cfg: dict, ids: list[int], first_position: int = 0) -> torch.Tensor:
    """Logits [s, vocab] (float64) for one unpadded sequence, its tokens at positions first_position, ..."""
    w = {k: v.double() for k, v in weights.items()}
    heads, d = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention", True) else heads
    eps = cfg["layernorm_epsilon"]
    base = 10000.0 * cfg.get("rope_ratio", 1.0)
    s = len(ids)
    pos = torch.arange(first_position, first_position + s)
    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q = qkv[:, : heads * d].reshape(s, heads, d)
        k = qkv[:, heads * d : heads * d + groups * d].reshape(s, groups, d)
        v = qkv[:, heads * d + groups * d :].reshape(s, groups, d)
        q, k = _rope(q, pos, base), _rope(k, pos, base)
        outs = []
        for head in range(heads):
            g = head // (heads // groups)
            scores = (q[:, head] @ k[:, g].T) / math.sqrt(d)
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v[:, g])
        attn = torch.cat(outs, -1) @ w[p + "self_attention.dense.weight"].T
        x = x + attn
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        a, b = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(a) * b) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = _rms(x, w["transformer.encoder.final_layernorm.weight"], eps)
    return x @ w["transformer.output_layer.weight"].T


def greedy(weights, cfg, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        out.append(int(forward(weights, cfg, out)[-1].argmax()))
    return out[len(ids) :]
