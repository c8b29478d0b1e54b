"""The static KV cache and the two compiled steps that use it: prompt prefill and one-token decode.

The cache is explicit data, not hidden state: one key and one value tensor per layer, each
[batch, kv_groups, max_len, head_dim], handed to each step and returned updated. Its size is fixed when
generation starts, so the decode step compiles once per (batch, max_len) and runs in graph mode.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from glm3.model import GLM3ForCausalLM, positions_and_mask


class PrefillStep(nn.Cell):
    """(input_ids [b, s], attention_mask [b, s]) -> (last-position logits [b, V], caches padded to max_len)."""

    def __init__(self, model: GLM3ForCausalLM, max_len: int):
        super().__init__(auto_prefix=False)  # share the model's parameters under their own names
        self.transformer = model.transformer
        self.max_len = max_len

    def construct(self, input_ids, attention_mask):
        seq_len = input_ids.shape[1]
        positions, keep = positions_and_mask(attention_mask, seq_len)
        logits, kv = self.transformer(input_ids, positions, keep, None, None, True)
        caches = ()
        for t in kv:
            caches = caches + (ops.pad(t, (0, 0, 0, self.max_len - seq_len)),)
        return logits, caches


class DecodeStep(nn.Cell):
    """One token per row: attends to every valid cache column and writes its own key/value at write_index."""

    def __init__(self, model: GLM3ForCausalLM, max_len: int):
        super().__init__(auto_prefix=False)
        self.transformer = model.transformer
        self.max_len = max_len

    def construct(self, input_ids, position_ids, key_mask, write_index, caches):
        b = input_ids.shape[0]
        write_mask = (ops.arange(self.max_len, dtype=ms.int32) == write_index).reshape(1, 1, self.max_len, 1)
        keep = key_mask.reshape(b, 1, 1, self.max_len)
        return self.transformer(input_ids, position_ids, keep, caches, write_mask, True)


class StaticKVCache:
    """Host-side bookkeeping of a cache: which columns hold valid keys and where the next token goes."""

    def __init__(self, caches: tuple, prompt_mask: np.ndarray, max_len: int):
        self.caches = caches
        self.max_len = max_len
        batch, prompt_len = prompt_mask.shape
        self.key_mask = np.zeros((batch, max_len), dtype=bool)
        self.key_mask[:, :prompt_len] = prompt_mask.astype(bool)
        self.next_index = prompt_len
        # Position of the next token of each row = number of real tokens it has so far.
        self.next_position = prompt_mask.sum(axis=1).astype(np.int32)

    def step_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mark the next column valid and return (position_ids, key_mask, write_index) for a decode step."""
        if self.next_index >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        self.key_mask[:, self.next_index] = True
        return (Tensor(self.next_position.reshape(-1, 1)), Tensor(self.key_mask),
                Tensor(np.int32(self.next_index)))

    def advance(self, caches: tuple) -> None:
        self.caches = caches
        self.next_index += 1
        self.next_position = self.next_position + 1


def runner(model: GLM3ForCausalLM, kind: str, max_len: int) -> nn.Cell:
    """The model's compiled prefill/decode step for a cache length, built once and reused."""
    key = (kind, max_len)
    if key not in model._runners:
        cls = {"prefill": PrefillStep, "decode": DecodeStep}[kind]
        model._runners[key] = cls(model, max_len)
    return model._runners[key]
