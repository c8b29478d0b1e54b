"""The engine: continuous batching of many requests over one KV cache, the one decoding driver of the project
(glm3.generate, the MindIR runner of an export and `glm3 serve` all run through it).

Each step (a token boundary) the scheduler (glm3.runtime.scheduler, which owns the KV-cache manager) says which
sequences swap out or in, which new ones are prefilled and which decode; the model runner
(glm3.runtime.model_runner) runs the steps on the block tables it is given; each sequence's next token is chosen
by its own settings and generator (glm3.runtime.sampling); a finished or aborted sequence leaves the batch at
once and its blocks are free for the next step.

Serving: a sequence's tokens do not depend on what else runs. Each prompt is prefilled alone, in a call whose
shape depends on the prompt only; decode calls are padded to fixed widths, and every product in them gives a
row the same bits whatever the width: with the CPU kernels (any width: the engine builds the model with
`kernel_rows` covering its widest decode call; attention's batched matmul runs over rows x key/value groups,
never a batch of one, for which MindSpore takes another path), else at one fixed width (MindSpore's MatMul
rounds differently for different row counts), the export's static batch or max_num_seqs.

`Engine` is driven by one thread (`step()`); `add` and `abort` may be called from any thread.
`BackgroundEngine` runs the steps in a thread of its own while there is work, and hands each sequence's
events to a listener.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable

import numpy as np

from glm3.runtime.kv_cache_manager import CacheConfig, KVCacheManager
from glm3.runtime.sampling import SamplingParams
from glm3.runtime.scheduler import FINISHED, QueueFull, Scheduler, Sequence
from glm3.settings import setting

log = logging.getLogger(__name__)

__all__ = ["BackgroundEngine", "Engine", "EngineConfig", "Event", "QueueFull"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = setting(16, "sequences decoded together at most")
    max_queue: int = setting(64, "requests waiting for a place at most; more are refused (HTTP 429)")
    cache: CacheConfig = setting(factory=CacheConfig, help="the paged KV cache (an export's own)", cli=False)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What the served model takes: prompt + new tokens <= max_model_len, prompts <= max_prompt_len."""

    max_model_len: int
    max_prompt_len: int
    vocab_size: int
    stop_ids: frozenset[int]


@dataclasses.dataclass(frozen=True)
class Event:
    """A sequence's news: a new token (None when it ended without one) and, at its end, why: "stop" (a stop
    token, which is `token`), "length" (max_tokens), "abort" or "error" (then `error` says what failed)."""

    seq: Sequence
    token: int | None
    finish_reason: str | None = None
    error: str | None = None


class Engine:
    """runner: a model runner (glm3.runtime.model_runner); kv: the KV-cache manager its cache needs (the
    scheduler owns it; default: a paged cache of config.cache, its scratch block reserved). raise_errors: a
    failing step raises (generate()) instead of failing its sequences (serving)."""

    def __init__(
        self,
        runner,
        limits: ModelLimits,
        config: EngineConfig,
        description: str = "",
        kv: KVCacheManager | None = None,
        raise_errors: bool = False,
    ):
        self.runner, self.limits, self.config, self.description = runner, limits, config, description
        max_blocks = getattr(getattr(runner, "shapes", None), "max_blocks", None)
        kv = kv or KVCacheManager.paged(config.cache, max_blocks)
        self.scheduler = Scheduler(kv, config.max_num_seqs, config.max_queue, admit_when_idle=runner.lockstep)
        self.raise_errors = raise_errors
        self.lock = threading.Lock()
        self._aborts: list[Sequence] = []
        self._ids = itertools.count()
        self.listeners: dict[int, Callable[[Event], None]] = {}
        self.tokens_generated = 0
        self.peak_decode_batch = 0  # the most sequences one step has decoded

    @property
    def max_tokens_limit(self) -> int:
        """The most tokens a sequence can hold: the model's context or the cache, the smaller."""
        return min(self.limits.max_model_len, self.scheduler.capacity_tokens)

    def check_prompt(self, prompt: list[int], max_tokens: int | None) -> int:
        """The max_tokens a request gets (ValueError naming the limit when the prompt or its budget is too
        long): at most what the context and the cache hold; None: all that is left of them."""
        n, limit = len(prompt), self.max_tokens_limit
        if n == 0:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.limits.vocab_size for t in prompt):
            raise ValueError(f"token ids must be in [0, {self.limits.vocab_size})")
        if n > self.limits.max_prompt_len or n >= limit:
            most = min(self.limits.max_prompt_len, limit - 1)
            raise ValueError(f"the prompt has {n} tokens; this model takes at most {most}")
        if max_tokens is None:
            return limit - n
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if n + max_tokens > limit:
            kv = self.scheduler.kv
            what = (
                f"this model's context is {limit} tokens"
                if limit == self.limits.max_model_len
                else f"the KV cache holds {limit} tokens ({kv.usable_blocks} usable blocks of {kv.block_size})"
            )
            raise ValueError(
                f"{what}: the prompt has {n} and max_tokens asks for {max_tokens} more (at most {limit - n})"
            )
        return max_tokens

    def add(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        max_tokens: int | None = None,
        listener: Callable[[Event], None] | None = None,
        ignore_stop: bool = False,
        stop_ids=None,
        generator_index: int = 0,
    ) -> Sequence:
        """Queue a request (ValueError for a bad one, QueueFull when the queue is at its bound). ignore_stop:
        generate max_tokens, past any stop token; stop_ids: its own stop tokens instead of the model's;
        generator_index: its row in a batch of prompts (its sampling generator's index)."""
        max_tokens = self.check_prompt(prompt, max_tokens)
        stops = frozenset() if ignore_stop else frozenset(self.limits.stop_ids if stop_ids is None else stop_ids)
        with self.lock:
            seq = Sequence(next(self._ids), list(prompt), max_tokens, sampling, stops, generator_index)
            self.scheduler.add(seq)
            if listener is not None:
                self.listeners[seq.seq_id] = listener
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a sequence; it leaves at the next token boundary, its blocks freed."""
        with self.lock:
            if seq.status != FINISHED:
                self._aborts.append(seq)

    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.waiting or s.swapped or self._aborts)

    def stats(self) -> dict:
        with self.lock:
            return {
                **self.scheduler.stats(),
                "tokens_generated": self.tokens_generated,
                "peak_decode_batch": self.peak_decode_batch,
            }

    def step(self) -> list[Event]:
        """One token boundary: aborts applied, then swaps, prefills and one decode call per width's worth of
        rows. Returns the events of this step (also given to each sequence's listener)."""
        events: list[Event] = []
        with self.lock:
            for seq in self._aborts:
                if seq.status != FINISHED:
                    self.scheduler.abort(seq)
                    events.append(Event(seq, None, "abort"))
            self._aborts.clear()
            plan = self.scheduler.schedule()
        # Copies out first: the blocks are free already and this step's writes may land in them.
        for seq, table in plan.swapped_out:
            seq.swapped = self.runner.swap_out(table)
        for seq in plan.swapped_in:
            self.runner.swap_in(self.scheduler.table(seq), seq.swapped)
            seq.swapped = None
        groups = [plan.prefill] if self.runner.shapes.together else [[seq] for seq in plan.prefill]
        for group in filter(None, groups):
            try:
                logits = self.runner.prefill([s.prompt for s in group], [self.scheduler.table(s) for s in group])
            except Exception as exc:  # a runtime failure fails these requests, not the server
                events.extend(self._fail(group, exc))
                continue
            events.extend(self._advance(seq, row[None]) for seq, row in zip(group, logits))
        if plan.decode:
            self.peak_decode_batch = max(self.peak_decode_batch, len(plan.decode))
            try:
                logits = self.runner.decode(
                    [s.output[-1] for s in plan.decode],
                    [s.position for s in plan.decode],
                    [self.scheduler.table(s) for s in plan.decode],
                )
            except Exception as exc:
                events.extend(self._fail(plan.decode, exc))
            else:
                events.extend(self._advance(seq, row[None]) for seq, row in zip(plan.decode, logits))
        for event in events:
            listener = self.listeners.get(event.seq.seq_id)
            if event.finish_reason is not None:
                self.listeners.pop(event.seq.seq_id, None)
            if listener is not None:
                listener(event)
        return events

    def _advance(self, seq: Sequence, logits: np.ndarray) -> Event:
        history = seq.history() if seq.sampling.repetition_penalty != 1.0 else np.zeros((1, 0), np.int64)
        token = int(seq.sampling.choose(logits, history, np.ones_like(history), [seq.rng])[0])
        seq.output.append(token)
        self.tokens_generated += 1
        reason = "stop" if token in seq.stop_ids else "length" if len(seq.output) >= seq.max_tokens else None
        if reason is not None:
            with self.lock:
                self.scheduler.finish(seq, reason)
        return Event(seq, token, reason)

    def reset(self, counters: bool = True) -> list[Sequence]:
        """Start over empty: every sequence out (returned, unfinished ones without an event), every block free,
        the caches zero (and with `counters`, the statistics at zero)."""
        with self.lock:
            seqs = [*self.scheduler.reset(), *self._aborts]
            self._aborts.clear()
            self.runner.reset()
            if counters:
                self.scheduler.preemptions = self.tokens_generated = self.peak_decode_batch = 0
        return seqs

    def fail_all(self, exc: Exception) -> None:
        """After an unexpected failure of a step: every sequence ends with an error event, and the cache and
        the scheduler start over empty (the server stays up)."""
        log.exception("engine step failed; failing every sequence", exc_info=exc)
        seqs = self.reset(counters=False)
        with self.lock:
            for seq in seqs:
                seq.status, seq.finish_reason, seq.swapped = FINISHED, "error", None
        for seq in dict.fromkeys(seqs):
            listener = self.listeners.pop(seq.seq_id, None)
            if listener is not None:
                listener(Event(seq, None, "error", f"{type(exc).__name__}: {exc}"))

    def _fail(self, seqs: list[Sequence], exc: Exception) -> list[Event]:
        if self.raise_errors:
            raise exc
        log.exception("engine step failed for sequence(s) %s", [s.seq_id for s in seqs], exc_info=exc)
        with self.lock:
            for seq in seqs:
                self.scheduler.finish(seq, "error")
        return [Event(seq, None, "error", f"{type(exc).__name__}: {exc}") for seq in seqs]


class BackgroundEngine:
    """An Engine stepping in a thread of its own whenever it has work."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="glm3-engine", daemon=True)
        self.thread.start()

    def add(self, prompt, sampling, max_tokens=None, listener=None, ignore_stop=False) -> Sequence:
        seq = self.engine.add(prompt, sampling, max_tokens, listener, ignore_stop)
        with self._wake:
            self._wake.notify()
        return seq

    def abort(self, seq: Sequence) -> None:
        self.engine.abort(seq)
        with self._wake:
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._closed

    def close(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.engine.has_work():
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self.engine.step()
            except Exception as exc:  # a bug, not a request's fault: fail what runs, keep serving
                self.engine.fail_all(exc)
