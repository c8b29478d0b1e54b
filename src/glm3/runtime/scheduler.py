"""Continuous batching: which sequences run at each token boundary, kept apart from the model (as vLLM keeps its
scheduler apart from its model runner). The scheduler owns the KV-cache manager (glm3.runtime.kv_cache_manager)
and is the only code that allocates or frees cache blocks; the engine carries out what a Schedule says (copies
blocks out and in, prefills, decodes) through a model runner, which reads the block tables and nothing else.

A request becomes a Sequence. It waits in a bounded queue, is admitted (its prompt's blocks allocated, the
prompt prefilled) as soon as those blocks are free and fewer than max_num_seqs sequences run, then decodes one
token per step together with the others, and leaves the moment it finishes or is aborted, its blocks freed.

When a running sequence needs a new block and none is free, the newest running sequences are swapped out (their
blocks freed at once; the engine copies them to host memory before anything is written this step) until it
fits; a swapped sequence comes back, its keys and values restored bit for bit, before any new one is admitted.
Nothing running is ever overwritten, and no sequence's tokens depend on having been swapped. No request is
admitted that the whole cache could not hold, so the oldest running sequence always fits, and everything
admitted finishes.

`admit_when_idle` (a static cache, whose rows decode in lockstep from one shared column): a batch is admitted
only when nothing runs, all of it at once.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from glm3.runtime.kv_cache_manager import KVCacheManager
from glm3.runtime.sampling import SamplingParams

WAITING, RUNNING, SWAPPED, FINISHED = "waiting", "running", "swapped", "finished"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request is refused (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens and state. output: the tokens generated so far (a stop token included).
    generator_index: its row in a batch of prompts (0 for a request served alone: the same seed gives the same
    tokens whatever else runs)."""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    generator_index: int = 0
    output: list[int] = dataclasses.field(default_factory=list)
    status: str = WAITING
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens), "abort"
    swapped: object = None  # the host copy of its blocks while swapped out (the engine's)
    cached_tokens: int = 0  # while swapped out: the tokens its saved blocks hold

    def __post_init__(self):
        self.rng = self.sampling.generator(self.generator_index)

    @property
    def position(self) -> int:
        """The position of its newest token (the one the next decode step feeds)."""
        return len(self.prompt) + len(self.output) - 1

    def history(self) -> np.ndarray:
        return np.asarray([self.prompt + self.output], np.int64)


@dataclasses.dataclass
class Schedule:
    """What one step does, in this order: swap out (copy these blocks to host memory: they are already free),
    swap in (write the host copies into the sequences' new blocks), prefill (new), decode (one token each)."""

    swapped_out: list[tuple[Sequence, list[int]]] = dataclasses.field(default_factory=list)
    swapped_in: list[Sequence] = dataclasses.field(default_factory=list)
    prefill: list[Sequence] = dataclasses.field(default_factory=list)
    decode: list[Sequence] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_queue: int, admit_when_idle: bool = False):
        if max_num_seqs < 1 or max_queue < 0:
            raise ValueError(f"max_num_seqs must be >= 1 and max_queue >= 0, got {max_num_seqs}, {max_queue}")
        self.kv = kv
        self.max_num_seqs, self.max_queue, self.admit_when_idle = max_num_seqs, max_queue, admit_when_idle
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the oldest first
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold."""
        return self.kv.capacity_tokens

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds {self.max_queue})")
        if len(seq.prompt) + seq.max_tokens > self.capacity_tokens:
            raise ValueError(
                f"{len(seq.prompt)} prompt tokens + {seq.max_tokens} new tokens exceed the KV cache "
                f"({self.capacity_tokens} tokens)"
            )
        self.waiting.append(seq)

    def table(self, seq: Sequence) -> list[int]:
        """The block table of a running sequence (what a model runner reads)."""
        return self.kv.tables[seq.seq_id]

    def abort(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is, freeing its blocks or its host copy."""
        if seq.status == WAITING:
            self.waiting.remove(seq)
        elif seq.status == RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
        elif seq.status == SWAPPED:
            self.swapped.remove(seq)
            seq.swapped = None
        if seq.status != FINISHED:
            seq.status, seq.finish_reason = FINISHED, "abort"

    def finish(self, seq: Sequence, reason: str) -> None:
        """A running sequence is done: out of the batch, its blocks (if it got any) freed."""
        self.running.remove(seq)
        if seq.seq_id in self.kv.tables:
            self.kv.free(seq.seq_id)
        seq.status, seq.finish_reason = FINISHED, reason

    def reset(self) -> list[Sequence]:
        """Every sequence out (returned, in no particular order) and every block free."""
        seqs = [*self.waiting, *self.running, *self.swapped]
        self.waiting.clear(), self.running.clear(), self.swapped.clear()
        self.kv.reset()
        return seqs

    def _swap_out(self, seq: Sequence, out: Schedule) -> None:
        table = list(self.kv.tables[seq.seq_id])
        seq.cached_tokens = self.kv.lengths[seq.seq_id]
        self.kv.free(seq.seq_id)
        seq.status = SWAPPED
        self.swapped.appendleft(seq)  # the newest is swapped out first and comes back last
        self.preemptions += 1
        out.swapped_out.append((seq, table))

    def schedule(self) -> Schedule:
        """Decide this step and make its block moves: the running sequences' next slots (swapping out the
        newest while one does not fit), then swapped sequences back, then new ones, their prompts' blocks."""
        out = Schedule()
        kv = self.kv
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if kv.new_blocks_to_append(seq.seq_id) > kv.free_blocks:
                self._swap_out(self.running.pop(), out)  # the newest; the loop has not given it a slot yet
                continue
            kv.append_slots(seq.seq_id)
            out.decode.append(seq)
            i += 1
        if out.swapped_out:
            return out  # nothing comes in in a step that had to make room
        while self.swapped and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            if kv.blocks_needed(seq.cached_tokens + 1) > kv.free_blocks:
                break
            self.swapped.popleft()
            kv.allocate(seq.seq_id, seq.cached_tokens)
            kv.append_slots(seq.seq_id)
            seq.status = RUNNING
            self.running.append(seq)
            out.swapped_in.append(seq)
            out.decode.append(seq)
        if self.swapped or (self.admit_when_idle and self.running):
            return out
        budget = kv.free_blocks
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = kv.blocks_needed(len(seq.prompt) + 1)  # its prompt and its first decoded token
            if need > budget:
                break
            budget -= kv.blocks_needed(len(seq.prompt))
            self.waiting.popleft()
            kv.allocate(seq.seq_id, len(seq.prompt))
            seq.status = RUNNING
            self.running.append(seq)
            out.prefill.append(seq)
        return out

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "swapped": len(self.swapped),
            "free_blocks": self.kv.free_blocks,
            "usable_blocks": self.kv.usable_blocks,
            "block_size": self.kv.block_size,
            "preemptions": self.preemptions,
        }
