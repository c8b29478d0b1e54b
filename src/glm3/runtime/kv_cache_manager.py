"""The KV-cache manager: which fixed-size blocks of the paged cache each sequence owns.

The cache is `num_blocks` blocks of `block_size` token slots (per layer, key and value alike). A sequence owns
a list of blocks (its block table); its token at position p lives in slot
    block_table[p // block_size] * block_size + p % block_size.
The scheduler (glm3.runtime.scheduler) owns the one manager of an engine and alone allocates and frees, as
vLLM v1's scheduler owns its KV-cache manager; model runners (glm3.runtime.model_runner) only read the block
tables it hands out. `allocate` gives a new sequence the blocks of its first tokens, `append_slots` extends a
sequence by any number of tokens (one a decode step; a chunk of a prompt), taking new blocks as the last fills.
Freed blocks return to the pool. Running out raises OutOfBlocks (callers that can wait check first).

With `reserve_scratch` block SCRATCH_BLOCK is never handed out: padding positions and the rows that only fill
a call up to its width write there, and no sequence reads it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm3.settings import setting

# The paged cache's default shape: MindFormers' ChatGLM3 setting for seq_length 2048 on one device
# (16 tokens per block, 224 blocks).
DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_BLOCKS = 224
SCRATCH_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The shape of a paged KV cache: the one holder of its block count and block size (the engine's, an
    export's, the manager's)."""

    num_blocks: int = setting(
        DEFAULT_NUM_BLOCKS, "paged KV-cache blocks, shared by all sequences (serving an export: its own)"
    )
    block_size: int = setting(DEFAULT_BLOCK_SIZE, "tokens per paged KV-cache block (serving an export: its own)")

    def __post_init__(self):
        if self.num_blocks < 2 or self.block_size < 1:
            raise ValueError(
                f"a paged cache needs num_blocks >= 2 (one is the scratch block) and block_size >= 1, got "
                f"{self.num_blocks}, {self.block_size}"
            )


class OutOfBlocks(RuntimeError):
    pass


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int = DEFAULT_NUM_BLOCKS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        reserve_scratch: bool = False,
        max_blocks_per_seq: int | None = None,
    ):
        if num_blocks < 1 + reserve_scratch or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.reserve_scratch = num_blocks, block_size, reserve_scratch
        self.usable_blocks = num_blocks - reserve_scratch
        self.max_blocks_per_seq = min(max_blocks_per_seq or self.usable_blocks, self.usable_blocks)
        self.reset()

    @classmethod
    def paged(cls, config: CacheConfig, max_blocks_per_seq: int | None = None) -> KVCacheManager:
        """The manager of a paged cache shared by sequences: its scratch block reserved."""
        return cls(config.num_blocks, config.block_size, True, max_blocks_per_seq)

    def reset(self) -> None:
        """Every block free, no sequence known."""
        reserved = {SCRATCH_BLOCK} if self.reserve_scratch else set()
        self._free = [b for b in range(self.num_blocks - 1, -1, -1) if b not in reserved]  # pop(): low ids first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold."""
        return self.max_blocks_per_seq * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def new_blocks_to_append(self, seq_id: int, num_tokens: int = 1) -> int:
        """The blocks append_slots(seq_id, num_tokens) would take."""
        return self.blocks_needed(self.lengths[seq_id] + num_tokens) - len(self.tables[seq_id])

    def _take(self, count: int, seq_id: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(
                f"sequence {seq_id} needs {count} more cache block(s) of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free; free finished sequences, wait, "
                "or raise num_blocks"
            )
        return [self._free.pop() for _ in range(count)]

    def allocate(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Blocks for a new sequence's first tokens; returns their slot mapping (int32 [num_tokens])."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if num_tokens < 1:
            raise ValueError("a sequence needs at least one token")
        self._check_length(seq_id, num_tokens)
        self.tables[seq_id] = self._take(self.blocks_needed(num_tokens), seq_id)
        self.lengths[seq_id] = num_tokens
        return self.slots(seq_id, range(num_tokens))

    def append_slots(self, seq_id: int, num_tokens: int = 1) -> np.ndarray:
        """The slots of the sequence's next num_tokens tokens (new blocks as the last fills; nothing taken
        when they do not fit)."""
        table, length = self.tables[seq_id], self.lengths[seq_id]
        self._check_length(seq_id, length + num_tokens)
        table += self._take(self.new_blocks_to_append(seq_id, num_tokens), seq_id)
        self.lengths[seq_id] = length + num_tokens
        return self.slots(seq_id, range(length, length + num_tokens))

    def _check_length(self, seq_id: int, num_tokens: int) -> None:
        if num_tokens > self.capacity_tokens:
            raise OutOfBlocks(f"sequence {seq_id} would hold {num_tokens} tokens, more than {self.capacity_tokens}")

    def slots(self, seq_id: int, positions) -> np.ndarray:
        return slot_mapping(self.tables[seq_id], list(positions), self.block_size)

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id)))
        del self.lengths[seq_id]

    def block_tables(self, seq_ids, width: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), width] block tables, padded with block 0 (masked out by the context length)."""
        return block_table_array([self.tables[s] for s in seq_ids], width)


def block_table_array(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """int32 [len(tables), width] of block tables, padded with block 0 (masked out by the context length)."""
    width = width or max(len(t) for t in tables)
    out = np.zeros((len(tables), width), np.int32)
    for row, table in enumerate(tables):
        if len(table) > width:
            raise ValueError(f"a sequence holds {len(table)} blocks, more than the table width {width}")
        out[row, : len(table)] = table
    return out


def slot_mapping(table, positions, block_size: int) -> np.ndarray:
    """The slots (int32) of `positions` of a sequence whose block table is `table`."""
    table, positions = np.asarray(table, np.int32), np.asarray(positions, np.int32)
    return table[positions // block_size] * block_size + positions % block_size
