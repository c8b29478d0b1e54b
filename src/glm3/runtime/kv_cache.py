"""KV caches on the host side: the bookkeeping of the cache a pair of compiled steps (glm3.runtime.steps, or the
MindIR graphs of an export) reads and writes, so that one generation loop drives either.

Two layouts:
- static: one key and one value tensor per layer, [batch, kv_groups, max_len, head_dim], a column per position;
- paged: one key and one value tensor per layer, [num_blocks, block_size, kv_groups, head_dim], shared by all
  sequences, each owning blocks through a block table (glm3.runtime.block_manager); prefill writes the prompt through
  a slot mapping, decode writes one slot per row and attends through the block tables.
`StaticCacheSteps` / `PagedCacheSteps` hold a prefill and a decode step for one batch of prompts: start(ids,
mask) and step(tokens) return the next token's logits. `PagedKVCache` is the paged cache shared by sequences
that come and go (the serving engine, glm3.runtime.engine): prefill one sequence, decode any set of them, swap a
sequence's blocks out to host memory and back.
"""

from __future__ import annotations

import dataclasses

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from glm3.runtime.block_manager import BlockManager

SCRATCH = -1  # the block manager's sequence id of the scratch block


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


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


@dataclasses.dataclass(frozen=True)
class BlockCaches:
    """The geometry of a paged cache: per layer one key and one value tensor [num_blocks, block_size,
    kv_groups, head_dim]."""

    num_layers: int
    kv_groups: int
    head_dim: int
    num_blocks: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.kv_groups, self.head_dim)


@dataclasses.dataclass(frozen=True)
class PagedShapes:
    """The inputs a pair of paged steps takes. Compiled Cells take any shape (each new one compiles once); the
    graphs of an export have some fixed (glm3.deploy.export).

    prompt_width: the prefill width, fixed (an export's prompt_length) or None: the prompt's length rounded up
    to a power of two, at least prompt_bucket (few shapes, each compiled once, for at most twice the prompt's
    work). prefill_batch: the rows of a prefill call (an export's static batch; a
    prompt's call is filled up with rows that write only to the scratch block). decode_widths: the batch
    widths of a decode call, ascending; rows are padded to the smallest that holds them, and more rows than the
    largest are decoded in calls of the largest. table_width: the block-table width, fixed (an export's
    max_blocks) or None: the longest sequence's block count rounded up to a power of two (at most max_blocks).
    """

    max_blocks: int
    prompt_width: int | None = None
    prompt_bucket: int = 32
    prefill_batch: int = 1
    decode_widths: tuple[int, ...] = (1,)
    table_width: int | None = None


class PagedKVCache:
    """The block caches of a paged model, shared by many sequences: 2 x layers tensors [num_blocks, block_size,
    kv_groups, head_dim] (float32), which the prefill and decode steps take and return, the block manager that
    says which blocks each sequence owns (self.blocks), and the inputs of the steps built from it.

    A padding token, or a row that only fills a call up to its width, writes to the scratch block, which no
    sequence reads. A row's inputs (its tokens, positions, blocks' contents, context length) do not depend on
    the other rows, nor on which blocks it was given.
    """

    def __init__(self, prefill, decode, geometry: BlockCaches, shapes: PagedShapes):
        self.prefill_step, self.decode_step, self.geometry, self.shapes = prefill, decode, geometry, shapes
        self.reset()

    def reset(self) -> None:
        """Every block free (but the scratch block), the caches zero."""
        g = self.geometry
        self.blocks = BlockManager(g.num_blocks, g.block_size)
        self.scratch_slot = int(self.blocks.allocate(SCRATCH, 1)[0])
        self.caches = tuple(Tensor(np.zeros(g.shape, np.float32)) for _ in range(2 * g.num_layers))

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can hold (all but the scratch block)."""
        return self.blocks.num_blocks - 1

    def run_prefill(self, ids: np.ndarray, mask: np.ndarray, slot_mapping: np.ndarray):
        """The prefill step on a whole batch ([b, w] each): the last positions' logits [b, V] (a Tensor)."""
        return self._keep(self.prefill_step(Tensor(ids), Tensor(mask), Tensor(slot_mapping), ms.mutable(self.caches)))

    def run_decode(self, tokens, positions, slots, block_tables, context_lens):
        """The decode step on a whole batch: the next-token logits [b, V] (a Tensor)."""
        return self._keep(
            self.decode_step(
                Tensor(np.asarray(tokens, np.int32).reshape(-1, 1)),
                Tensor(np.asarray(positions, np.int32).reshape(-1, 1)),
                Tensor(np.asarray(slots, np.int32)),
                Tensor(block_tables),
                Tensor(np.asarray(context_lens, np.int32)),
                ms.mutable(self.caches),
            )
        )

    def _keep(self, result):
        """The logits of a step's result; its caches, when it returns them (steps that write in place don't)."""
        if isinstance(result, (tuple, list)):
            logits, caches = result
            self.caches = tuple(caches)
            return logits
        return result

    def prefill(self, seq_id: int, prompt) -> np.ndarray:
        """Blocks for a new sequence's prompt and its keys and values written into them: the logits [V] after
        its last token. Raises OutOfBlocks (nothing allocated) when the blocks are not free."""
        n, s = len(prompt), self.shapes
        width = s.prompt_width or max(s.prompt_bucket, next_power_of_two(n))
        if n > width:
            raise ValueError(f"a prompt of {n} tokens is longer than the prefill width {width}")
        slots = self.blocks.allocate(seq_id, n)
        ids = np.zeros((s.prefill_batch, width), np.int32)
        mask = np.zeros((s.prefill_batch, width), np.int32)
        slot_mapping = np.full((s.prefill_batch, width), self.scratch_slot, np.int32)
        ids[:, width - n :], mask[:, width - n :] = prompt, 1  # filler rows: the same prompt, written to scratch
        slot_mapping[0, width - n :] = slots
        return self.run_prefill(ids, mask, slot_mapping).asnumpy()[0].copy()

    def decode(self, seq_ids, tokens) -> np.ndarray:
        """One token per sequence, each written to the slot the block manager last appended for it (the
        caller appends one per sequence first): the next-token logits [len(seq_ids), V]."""
        widest = self.shapes.decode_widths[-1]
        if len(seq_ids) > widest:
            return np.concatenate(
                [self.decode(seq_ids[i : i + widest], tokens[i : i + widest]) for i in range(0, len(seq_ids), widest)]
            )
        return self.run_decode(*self.decode_inputs(seq_ids, tokens)).asnumpy()[: len(seq_ids)].copy()

    def decode_inputs(self, seq_ids, tokens) -> tuple:
        """(tokens, positions, slots, block tables, context lengths) of a decode call for these sequences (at
        most the widest decode width), padded to the smallest width that holds them."""
        n = len(seq_ids)
        width = next(w for w in self.shapes.decode_widths if w >= n)
        lengths = [self.blocks.lengths[s] for s in seq_ids]
        slots = [self.blocks.slot(s, length - 1) for s, length in zip(seq_ids, lengths)]
        table_width = self.shapes.table_width or min(
            self.shapes.max_blocks, next_power_of_two(max(self.blocks.blocks_needed(length) for length in lengths))
        )
        tables = np.zeros((width, table_width), np.int32)
        tables[:n] = self.blocks.block_tables(seq_ids, table_width)
        pad = width - n  # filler rows: token 0 at position 0, written to scratch, attending to one key
        return (
            list(tokens) + [0] * pad,
            [length - 1 for length in lengths] + [0] * pad,
            slots + [self.scratch_slot] * pad,
            tables,
            lengths + [1] * pad,
        )

    def swap_out(self, seq_id: int) -> tuple[int, list[np.ndarray]]:
        """Copy a sequence's blocks to host memory and free them: (tokens in the cache, one array per cache)."""
        length, table = self.blocks.lengths[seq_id], Tensor(np.asarray(self.blocks.tables[seq_id], np.int32))
        saved = [ops.gather(cache, table, 0).asnumpy().copy() for cache in self.caches]
        self.blocks.free(seq_id)
        return length, saved

    def swap_in(self, seq_id: int, swapped: tuple[int, list[np.ndarray]]) -> None:
        """New blocks for a swapped-out sequence, its saved keys and values written back into them, bit for bit.
        Raises OutOfBlocks (nothing allocated) when the blocks are not free."""
        length, saved = swapped
        self.blocks.allocate(seq_id, length)
        index = Tensor(np.asarray(self.blocks.tables[seq_id], np.int32).reshape(-1, 1))
        self.caches = tuple(
            ops.tensor_scatter_update(cache, index, Tensor(data)) for cache, data in zip(self.caches, saved)
        )


class PagedCacheSteps:
    """Drives a paged-cache prefill/decode pair for one batch of prompts (each row a sequence of its own
    blocks), as StaticCacheSteps does a static cache: start(ids, mask) and step(tokens) return next-token
    logits. Every start() begins with all blocks free; running out raises block_manager.OutOfBlocks."""

    def __init__(self, prefill, decode, geometry: BlockCaches, max_blocks: int):
        self.prefill, self.decode, self.geometry, self.max_blocks = prefill, decode, geometry, max_blocks
        self.cache: PagedKVCache | None = None

    def start(self, ids: np.ndarray, mask: np.ndarray):
        batch, width = ids.shape
        shapes = PagedShapes(self.max_blocks, decode_widths=(batch,), table_width=self.max_blocks)
        self.cache = cache = PagedKVCache(self.prefill, self.decode, self.geometry, shapes)
        lengths = mask.sum(axis=1).astype(np.int32)
        slot_mapping = np.full((batch, width), cache.scratch_slot, np.int32)
        for row in range(batch):
            slot_mapping[row, width - lengths[row] :] = cache.blocks.allocate(row, int(lengths[row]))
        self.rows = list(range(batch))
        return cache.run_prefill(ids, mask, slot_mapping)

    def step(self, tokens: np.ndarray):
        for row in self.rows:
            self.cache.blocks.append_slot(row)
        return self.cache.run_decode(*self.cache.decode_inputs(self.rows, tokens))
