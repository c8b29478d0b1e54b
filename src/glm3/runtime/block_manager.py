"""The block manager of a paged KV cache: which fixed-size cache blocks each sequence owns.

The cache is `num_blocks` blocks of `block_size` token slots (per layer, key and value alike). A sequence owns
a list of blocks (its block table); its token at position p lives in slot
    block_table[p // block_size] * block_size + p % block_size.
Prefill writes a prompt through its slot mapping (one slot per token); each decode step appends one slot,
taking a new block when the last one is full. Freed blocks return to the pool. Running out of blocks raises
OutOfBlocks (callers that can wait check `can_allocate` first).
"""

from __future__ import annotations

import numpy as np

# The paged cache's default shape: MindFormers' ChatGLM3 setting for seq_length 2048 on one device
# (16 tokens per block, 224 blocks). Every default of the project (export, CLI) refers to these.
DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_BLOCKS = 224


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int = DEFAULT_NUM_BLOCKS, block_size: int = DEFAULT_BLOCK_SIZE):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def _take(self, count: int, seq_id: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(
                f"sequence {seq_id} needs {count} more cache block(s) of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free; free finished sequences, wait, "
                "or raise num_blocks"
            )
        return [self._free.pop() for _ in range(count)]

    def allocate(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Blocks for a new sequence's prompt; returns its slot mapping (int32 [num_tokens])."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if num_tokens < 1:
            raise ValueError("a sequence needs at least one token")
        self.tables[seq_id] = self._take(self.blocks_needed(num_tokens), seq_id)
        self.lengths[seq_id] = num_tokens
        return self.slots(seq_id, range(num_tokens))

    def append_slot(self, seq_id: int) -> int:
        """The slot of the sequence's next token (a new block when the last is full)."""
        table, length = self.tables[seq_id], self.lengths[seq_id]
        if length == len(table) * self.block_size:
            table += self._take(1, seq_id)
        self.lengths[seq_id] = length + 1
        return self.slot(seq_id, length)

    def slot(self, seq_id: int, position: int) -> int:
        """The slot of one position of the sequence (slots() for one, in plain integers: once per decoded token)."""
        return self.tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq_id: int, positions) -> np.ndarray:
        table = np.asarray(self.tables[seq_id], np.int32)
        positions = np.asarray(list(positions), np.int32)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id)))
        del self.lengths[seq_id]

    def block_tables(self, seq_ids, width: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), width] block tables, padded with block 0 (masked out by the context length)."""
        width = width or max(len(self.tables[s]) for s in seq_ids)
        out = np.zeros((len(seq_ids), width), np.int32)
        for row, s in enumerate(seq_ids):
            table = self.tables[s]
            if len(table) > width:
                raise ValueError(f"sequence {s} holds {len(table)} blocks, more than the table width {width}")
            out[row, : len(table)] = table
        return out
