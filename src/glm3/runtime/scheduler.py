"""Continuous batching: which sequences run at each token boundary, kept apart from the model (as vLLM keeps its
scheduler apart from its model runner).

A request becomes a Sequence. It waits in a bounded queue, is admitted (its prompt prefilled) as soon as its
prompt's blocks are free and fewer than max_num_seqs sequences run, then decodes one token per step together
with the others, and leaves the moment it finishes or is aborted, its blocks freed at once.

When a running sequence needs a new block and none is free, the newest running sequences are swapped out (the
cache copies their blocks to host memory and frees them) until it fits; a swapped sequence comes back, its keys
and values restored bit for bit, before any new one is admitted. Nothing running is ever overwritten, and no
sequence's tokens depend on having been swapped. No request is admitted that the whole cache could not hold,
so the oldest running sequence always fits, and everything admitted finishes.

The cache is duck-typed (glm3.runtime.kv_cache.PagedKVCache): its block manager `blocks`, `usable_blocks`, and
`swap_out(seq_id)` / `swap_in(seq_id, saved)`.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from glm3.runtime.sampling import SamplingParams

WAITING, RUNNING, SWAPPED, FINISHED = "waiting", "running", "swapped", "finished"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request is refused (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens and state. output: the tokens generated so far (a stop token included)."""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    output: list[int] = dataclasses.field(default_factory=list)
    status: str = WAITING
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens), "abort"
    swapped: object = None  # the host copy of its blocks while swapped out

    def __post_init__(self):
        # The generator a request served alone would use (row 0), so a seed gives the same tokens whatever runs.
        self.rng = self.sampling.generator(0)

    def history(self) -> np.ndarray:
        return np.asarray([self.prompt + self.output], np.int64)


@dataclasses.dataclass
class Schedule:
    """What one step does, in this order: swapped out, swapped in, prefilled (new), decoded (one token each)."""

    swapped_out: list[Sequence] = dataclasses.field(default_factory=list)
    swapped_in: list[Sequence] = dataclasses.field(default_factory=list)
    prefill: list[Sequence] = dataclasses.field(default_factory=list)
    decode: list[Sequence] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, cache, max_num_seqs: int, max_queue: int):
        if max_num_seqs < 1 or max_queue < 0:
            raise ValueError(f"max_num_seqs must be >= 1 and max_queue >= 0, got {max_num_seqs}, {max_queue}")
        self.cache, self.blocks = cache, cache.blocks
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the oldest first
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold: the whole cache but the scratch block."""
        return self.cache.usable_blocks * self.blocks.block_size

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds {self.max_queue})")
        if len(seq.prompt) + seq.max_tokens > self.capacity_tokens:
            raise ValueError(
                f"{len(seq.prompt)} prompt tokens + {seq.max_tokens} new tokens exceed the KV cache "
                f"({self.capacity_tokens} tokens)"
            )
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is, freeing its blocks or its host copy."""
        if seq.status == WAITING:
            self.waiting.remove(seq)
        elif seq.status == RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq.status == SWAPPED:
            self.swapped.remove(seq)
            seq.swapped = None
        if seq.status != FINISHED:
            seq.status, seq.finish_reason = FINISHED, "abort"

    def finish(self, seq: Sequence, reason: str) -> None:
        """A running sequence is done: out of the batch, its blocks (if it got any) freed."""
        self.running.remove(seq)
        if seq.seq_id in self.blocks.tables:
            self.blocks.free(seq.seq_id)
        seq.status, seq.finish_reason = FINISHED, reason

    def _needs_block(self, seq: Sequence) -> bool:
        return self.blocks.lengths[seq.seq_id] == len(self.blocks.tables[seq.seq_id]) * self.blocks.block_size

    def _swap_out(self, seq: Sequence) -> None:
        seq.swapped = self.cache.swap_out(seq.seq_id)
        seq.status = SWAPPED
        self.swapped.appendleft(seq)  # the newest is swapped out first and comes back last
        self.preemptions += 1

    def schedule(self) -> Schedule:
        """Decide this step and make its block moves: the running sequences' next slots (swapping out the
        newest while one does not fit), then swapped sequences back, then new ones (the caller prefills them
        into the blocks they are given: their slots are allocated by the cache's prefill)."""
        out = Schedule()
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if self._needs_block(seq) and self.blocks.free_blocks == 0:
                victim = self.running.pop()  # the newest; the loop has not given it a slot yet
                self._swap_out(victim)
                out.swapped_out.append(victim)
                continue
            self.blocks.append_slot(seq.seq_id)
            out.decode.append(seq)
            i += 1
        if out.swapped_out:
            return out  # nothing comes in in a step that had to make room
        while self.swapped and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            length = seq.swapped[0]
            if self.blocks.blocks_needed(length + 1) > self.blocks.free_blocks:
                break
            self.swapped.popleft()
            self.cache.swap_in(seq.seq_id, seq.swapped)
            seq.swapped, seq.status = None, RUNNING
            self.blocks.append_slot(seq.seq_id)
            self.running.append(seq)
            out.swapped_in.append(seq)
            out.decode.append(seq)
        if self.swapped:
            return out
        budget = self.blocks.free_blocks
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = self.blocks.blocks_needed(len(seq.prompt) + 1)  # its prompt and its first decoded token
            if need > budget:
                break
            budget -= self.blocks.blocks_needed(len(seq.prompt))
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            out.prefill.append(seq)
        return out

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "swapped": len(self.swapped),
            "free_blocks": self.blocks.free_blocks,
            "usable_blocks": self.cache.usable_blocks,
            "block_size": self.blocks.block_size,
            "preemptions": self.preemptions,
        }
