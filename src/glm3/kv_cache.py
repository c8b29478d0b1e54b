"""KV caches on the host side: the bookkeeping of the cache a pair of compiled steps (glm3.steps, or the
MindIR graphs of an export) reads and writes, so that one generation loop drives either.

Two layouts:
- static: one key and one value tensor per layer, [batch, kv_groups, max_len, head_dim], a column per position;
- paged: one key and one value tensor per layer, [num_blocks, block_size, kv_groups, head_dim], shared by all
  sequences, each owning blocks through a block table (glm3.block_manager); prefill writes the prompt through
  a slot mapping, decode writes one slot per row and attends through the block tables.
`StaticCacheSteps` / `PagedCacheSteps` hold a prefill and a decode step: start(ids, mask) and step(tokens)
return the next token's logits.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor

from glm3.block_manager import BlockManager


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
        return (Tensor(self.next_position.reshape(-1, 1)), Tensor(self.key_mask), Tensor(np.int32(self.next_index)))

    def advance(self, caches: tuple) -> None:
        self.caches = caches
        self.next_index += 1
        self.next_position = self.next_position + 1


class StaticCacheSteps:
    """Drives a static-cache prefill/decode pair: start(ids, mask) and step(tokens) return next-token logits."""

    def __init__(self, prefill, decode, max_len: int):
        self.prefill, self.decode, self.max_len = prefill, decode, max_len

    def start(self, ids: np.ndarray, mask: np.ndarray):
        logits, caches = self.prefill(Tensor(ids), Tensor(mask))
        self.cache = StaticKVCache(caches, mask, self.max_len)
        return logits

    def step(self, tokens: np.ndarray):
        position_ids, key_mask, write_index = self.cache.step_inputs()
        logits, caches = self.decode(
            Tensor(tokens.astype(np.int32).reshape(-1, 1)),
            position_ids,
            key_mask,
            write_index,
            ms.mutable(tuple(self.cache.caches)),
        )
        self.cache.advance(caches)
        return logits


class PagedCacheSteps:
    """Drives a paged-cache prefill/decode pair. Each row is a sequence with its own blocks; the first block
    handed out is scratch space where padding positions write. Every start() begins with all blocks free;
    running out of blocks raises block_manager.OutOfBlocks."""

    def __init__(
        self,
        prefill,
        decode,
        num_layers: int,
        kv_groups: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        max_blocks: int,
    ):
        self.prefill, self.decode = prefill, decode
        self.shape = (num_blocks, block_size, kv_groups, head_dim)
        self.num_layers, self.max_blocks = num_layers, max_blocks
        self.blocks: BlockManager | None = None

    def start(self, ids: np.ndarray, mask: np.ndarray):
        batch, width = ids.shape
        self.blocks = BlockManager(*self.shape[:2])
        scratch = int(self.blocks.allocate(-1, 1)[0])
        lengths = mask.sum(axis=1).astype(np.int32)
        slot_mapping = np.full((batch, width), scratch, np.int32)
        for row in range(batch):
            slot_mapping[row, width - lengths[row] :] = self.blocks.allocate(row, int(lengths[row]))
        self.rows = list(range(batch))
        self.next_position = lengths.copy()
        caches = ms.mutable(tuple(Tensor(np.zeros(self.shape, np.float32)) for _ in range(2 * self.num_layers)))
        logits, self.caches = self.prefill(Tensor(ids), Tensor(mask), Tensor(slot_mapping), caches)
        return logits

    def step(self, tokens: np.ndarray):
        slots = np.array([self.blocks.append_slot(row) for row in self.rows], np.int32)
        context_lens = np.array([self.blocks.lengths[row] for row in self.rows], np.int32)
        logits, self.caches = self.decode(
            Tensor(tokens.astype(np.int32).reshape(-1, 1)),
            Tensor(self.next_position.reshape(-1, 1)),
            Tensor(slots),
            Tensor(self.blocks.block_tables(self.rows, self.max_blocks)),
            Tensor(context_lens),
            ms.mutable(tuple(self.caches)),
        )
        self.next_position = self.next_position + 1
        return logits
