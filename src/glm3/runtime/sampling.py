"""How the next token is chosen from float32 logits: greedy or sampled, with a repetition penalty, temperature,
top-k and top-p, one seeded generator per sequence.

One row's choice depends only on its own logits, history, settings and generator, never on the rows it is
batched with, so the generation loop (a batch of one request's prompts) and the serving engine (sequences of
different requests, each with its own settings) choose alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """do_sample False: greedy (temperature, top_k and top_p are then ignored; the repetition penalty applies).
    seed: the generator of a sequence is numpy's default_rng([seed, index]) (index: its row in a batch of
    prompts; 0 for a request served alone), so the same seed gives the same tokens."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generator(self, index: int = 0) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else [self.seed, index])

    def choose(self, logits: np.ndarray, history: np.ndarray, history_mask: np.ndarray, rngs) -> np.ndarray:
        """The next token ([b] int64) of each row of float32 logits [b, V]; history [b, n] and its 0/1 mask
        are the tokens so far (for the repetition penalty); rngs one generator per row."""
        scores = logits
        if self.do_sample or self.repetition_penalty != 1.0:
            scores = process_logits(
                logits,
                history,
                history_mask,
                temperature=self.temperature if self.do_sample else 1.0,
                top_k=self.top_k if self.do_sample else 0,
                top_p=self.top_p if self.do_sample else 1.0,
                repetition_penalty=self.repetition_penalty,
            )
        if not self.do_sample:
            return scores.argmax(axis=-1).astype(np.int64)
        probs = softmax(scores.astype(np.float64))
        return np.array([rng.choice(probs.shape[-1], p=p) for rng, p in zip(rngs, probs)], dtype=np.int64)


def process_logits(
    logits: np.ndarray,
    history: np.ndarray,
    history_mask: np.ndarray,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
) -> np.ndarray:
    """Apply repetition penalty, temperature, top-k and top-p to float32 logits [batch, V] (a copy)."""
    logits = logits.astype(np.float32, copy=True)
    if repetition_penalty != 1.0:
        for row in range(logits.shape[0]):
            seen = np.unique(history[row][history_mask[row].astype(bool)])
            scores = logits[row, seen]
            logits[row, seen] = np.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
    if temperature != 1.0:
        logits /= temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = softmax(sorted_logits)
        # Drop a token once the mass of the tokens ranked above it already reaches top_p (keep >= 1).
        drop_sorted = (np.cumsum(probs, -1) - probs) >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits[drop] = -np.inf
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
