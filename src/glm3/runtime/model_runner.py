"""Model runners: the cache tensors a pair of compiled steps (glm3.runtime.steps, or the MindIR graphs of an
export) reads and writes, and the step inputs built from the block tables the scheduler hands out. A runner
allocates nothing: which blocks (or rows) a sequence owns is the KV-cache manager's (the scheduler's).

Two layouts:
- paged (`PagedRunner`): one key and one value tensor per layer, [num_blocks, block_size, kv_groups, head_dim],
  shared by all sequences; prefill writes a prompt through its slot mapping, decode writes one slot per row
  and attends through the block tables. Padding, and rows that only fill a call up to its width, write to the
  scratch block (glm3.runtime.kv_cache_manager.SCRATCH_BLOCK), which no sequence reads.
- static (`StaticRunner`): one key and one value tensor per layer, [rows, kv_groups, max_len, head_dim], a row
  per sequence (its one "block"), prompts left-padded to one width and decoded in lockstep from one shared
  column (the static export's graphs take a single write index), so a batch is admitted all at once.

Prefill is `together` (the admitted prompts in one call, left-padded to one width: generate() and an export's
batch) or alone (one call per prompt, whose shape depends on that prompt only: serving, where a row's bits must
not depend on what else was admitted).
"""

from __future__ import annotations

import dataclasses

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from glm3.runtime.kv_cache_manager import SCRATCH_BLOCK, CacheConfig, block_table_array, slot_mapping

# Prompts are left-padded to a multiple of this (or, prefilled alone, to a power of two at least this), so
# that a handful of compiled graphs serve every prompt length.
PROMPT_BUCKET = 32


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
    """The tensors of a paged cache: per layer one key and one value tensor [num_blocks, block_size,
    kv_groups, head_dim]."""

    num_layers: int
    kv_groups: int
    head_dim: int
    cache: CacheConfig

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.cache.num_blocks, self.cache.block_size, self.kv_groups, self.head_dim)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The inputs a pair of steps takes. Compiled Cells take any shape (each new one compiles once); the graphs
    of an export have some fixed (glm3.deploy.export).

    prompt_width: the prefill width, fixed (an export's prompt_length) or None (see prefill_width).
    prefill_batch: the rows of a prefill call, fixed (an export's static batch: a call is filled up with copies
    of its first prompt writing to the scratch block) or None (the prompts of the call). together: prefill the
    admitted prompts in one call (else one call each). decode_widths: the batch widths of a decode call,
    ascending; rows are padded to the smallest that holds them, and more rows than the largest are decoded in
    calls of the largest. max_blocks: the longest block table; table_width: its width in a call, fixed (an
    export's max_blocks) or None: the longest sequence's block count rounded up to a power of two.
    """

    max_blocks: int
    prompt_width: int | None = None
    prefill_batch: int | None = None
    together: bool = False
    decode_widths: tuple[int, ...] = (1,)
    table_width: int | None = None

    def prefill_width(self, longest: int) -> int:
        """The width a call prefilling prompts of at most `longest` tokens takes: fixed, or a multiple of
        PROMPT_BUCKET (together), or a power of two of at least PROMPT_BUCKET (alone: few shapes, each compiled
        once, for at most twice the prompt's work)."""
        if self.prompt_width is not None:
            width = self.prompt_width
        elif self.together:
            width = round_up(longest, PROMPT_BUCKET)
        else:
            width = max(PROMPT_BUCKET, next_power_of_two(longest))
        if longest > width:
            raise ValueError(f"a prompt of {longest} tokens is longer than the prefill width {width}")
        return width

    def prefill_rows(self, prompts: int) -> int:
        rows = self.prefill_batch or prompts
        if prompts > rows:
            raise ValueError(f"{prompts} prompts in one prefill call of {rows} rows")
        return rows


def _padded(prompts, rows: int, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and 0/1 mask [rows, width] of left-padded prompts; rows past the prompts repeat the first one."""
    ids = np.full((rows, width), pad, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for row in range(rows):
        prompt = prompts[row] if row < len(prompts) else prompts[0]
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return ids, mask


class PagedRunner:
    """The block caches of a paged model, shared by many sequences: 2 x layers tensors (float32), which the
    prefill and decode steps take and return (or write in place: steps over the CPU kernels return the logits
    only). A row's inputs (its tokens, positions, blocks' contents, context length) do not depend on the other
    rows, nor on which blocks it was given."""

    lockstep = False  # sequences come and go at any step

    def __init__(self, prefill, decode, geometry: CacheGeometry, shapes: StepShapes, pad: int = 0):
        self.prefill_step, self.decode_step, self.geometry, self.shapes, self.pad = (
            prefill,
            decode,
            geometry,
            shapes,
            pad,
        )
        self.block_size = geometry.cache.block_size
        self.scratch_slot = SCRATCH_BLOCK * self.block_size
        self.reset()

    def reset(self) -> None:
        """The caches zero."""
        g = self.geometry
        self.caches = tuple(Tensor(np.zeros(g.shape, np.float32)) for _ in range(2 * g.num_layers))

    def _keep(self, result):
        """The logits of a step's result; its caches, when it returns them (steps that write in place don't)."""
        if isinstance(result, (tuple, list)):
            logits, caches = result
            self.caches = tuple(caches)
            return logits
        return result

    def _run_prefill(self, prompts, tables) -> np.ndarray:
        """One prefill call: the logits [len(prompts), V] after each prompt; tables None: every slot scratch."""
        s = self.shapes
        width = s.prefill_width(max(len(p) for p in prompts))
        ids, mask = _padded(prompts, s.prefill_rows(len(prompts)), width, self.pad)
        slots = np.full(ids.shape, self.scratch_slot, np.int32)
        for row, table in enumerate(tables or ()):
            n = len(prompts[row])
            slots[row, width - n :] = slot_mapping(table, range(n), self.block_size)
        result = self.prefill_step(Tensor(ids), Tensor(mask), Tensor(slots), ms.mutable(self.caches))
        return self._keep(result).asnumpy()[: len(prompts)].copy()

    def prefill(self, prompts: list[list[int]], tables: list[list[int]]) -> np.ndarray:
        """Each prompt's keys and values written into its blocks: the logits [len(prompts), V] after its last
        token (one call, or one each: StepShapes.together)."""
        if self.shapes.together:
            return self._run_prefill(prompts, tables)
        return np.concatenate([self._run_prefill([p], [t]) for p, t in zip(prompts, tables)])

    def prompt_logits(self, prompts: list[list[int]]) -> np.ndarray:
        """The logits after each prompt, nothing kept (every key and value goes to the scratch block)."""
        return self._run_prefill(prompts, None)

    def decode(self, tokens, positions, tables) -> np.ndarray:
        """One token per sequence at its position (its slot allocated): the next-token logits [n, V]."""
        widest = self.shapes.decode_widths[-1]
        n = len(tokens)
        if n > widest:
            return np.concatenate(
                [
                    self.decode(tokens[i : i + widest], positions[i : i + widest], tables[i : i + widest])
                    for i in range(0, n, widest)
                ]
            )
        width = next(w for w in self.shapes.decode_widths if w >= n)
        lengths = [p + 1 for p in positions]
        slots = [int(slot_mapping(t, [p], self.block_size)[0]) for t, p in zip(tables, positions)]
        table_width = self.shapes.table_width or min(
            self.shapes.max_blocks, next_power_of_two(max(-(-length // self.block_size) for length in lengths))
        )
        block_tables = np.zeros((width, table_width), np.int32)
        block_tables[:n] = block_table_array(tables, table_width)
        pad = width - n  # filler rows: token 0 at position 0, written to scratch, attending to one key
        logits = self._keep(
            self.decode_step(
                Tensor(np.asarray(list(tokens) + [0] * pad, np.int32).reshape(-1, 1)),
                Tensor(np.asarray(list(positions) + [0] * pad, np.int32).reshape(-1, 1)),
                Tensor(np.asarray(slots + [self.scratch_slot] * pad, np.int32)),
                Tensor(block_tables),
                Tensor(np.asarray(lengths + [1] * pad, np.int32)),
                ms.mutable(self.caches),
            )
        )
        return logits.asnumpy()[:n].copy()

    def swap_out(self, table: list[int]) -> list[np.ndarray]:
        """A copy of these blocks in host memory, one array per cache."""
        index = Tensor(np.asarray(table, np.int32))
        return [ops.gather(cache, index, 0).asnumpy().copy() for cache in self.caches]

    def swap_in(self, table: list[int], saved: list[np.ndarray]) -> None:
        """Write a host copy (swap_out's) into the first blocks of this table, bit for bit (the table may hold
        more: the block its next token needs)."""
        index = Tensor(np.asarray(table[: len(saved[0])], np.int32).reshape(-1, 1))
        self.caches = tuple(
            ops.tensor_scatter_update(cache, index, Tensor(data)) for cache, data in zip(self.caches, saved)
        )


class StaticRunner:
    """A static cache of `rows` rows of max_len columns: the row of a sequence is its block table's one block.
    Prefill (all admitted prompts at once, left-padded to one width) returns the caches; each decode call
    takes every row and writes the shared next column (rows without a sequence decode the pad token)."""

    lockstep = True  # a batch is admitted when nothing runs (one shared write column)

    def __init__(self, prefill, decode, max_len: int, rows: int, prompt_width: int | None = None, pad: int = 0):
        self.prefill_step, self.decode_step, self.max_len, self.rows, self.pad = prefill, decode, max_len, rows, pad
        self.shapes = StepShapes(1, prompt_width=prompt_width, prefill_batch=rows, together=True, decode_widths=(rows,))
        self.reset()

    def reset(self) -> None:
        self.caches = None
        self.key_mask = np.zeros((self.rows, self.max_len), bool)
        self.next_index = 0
        self.positions = np.zeros(self.rows, np.int32)

    def _run_prefill(self, prompts, rows):
        width = self.shapes.prefill_width(max(len(p) for p in prompts))
        ordered = [None] * self.rows
        for prompt, row in zip(prompts, rows):
            ordered[row] = prompt
        ids, mask = _padded([p if p is not None else prompts[0] for p in ordered], self.rows, width, self.pad)
        logits, caches = self.prefill_step(Tensor(ids), Tensor(mask))
        return logits.asnumpy()[rows].copy(), caches, mask

    def prefill(self, prompts: list[list[int]], tables: list[list[int]]) -> np.ndarray:
        rows = [table[0] for table in tables]
        logits, caches, mask = self._run_prefill(prompts, rows)
        self.caches = tuple(caches)
        width = mask.shape[1]
        self.key_mask[:] = False
        self.key_mask[:, :width] = mask.astype(bool)
        self.next_index = width
        self.positions = mask.sum(axis=1).astype(np.int32)  # the next token's position: the tokens so far
        return logits

    def prompt_logits(self, prompts: list[list[int]]) -> np.ndarray:
        return self._run_prefill(prompts, list(range(len(prompts))))[0]

    def decode(self, tokens, positions, tables) -> np.ndarray:
        if self.next_index >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        rows = [table[0] for table in tables]
        all_tokens = np.full(self.rows, self.pad, np.int32)
        all_tokens[rows] = tokens
        self.positions[rows] = positions
        self.key_mask[:, self.next_index] = True
        logits, caches = self.decode_step(
            Tensor(all_tokens.reshape(-1, 1)),
            Tensor(self.positions.reshape(-1, 1)),
            Tensor(self.key_mask),
            Tensor(np.int32(self.next_index)),
            ms.mutable(tuple(self.caches)),
        )
        self.caches = tuple(caches)
        self.next_index += 1
        self.positions = self.positions + 1
        return logits.asnumpy()[rows].copy()

    def swap_out(self, table):
        raise RuntimeError("a static cache does not swap (its rows decode in lockstep)")

    swap_in = swap_out
