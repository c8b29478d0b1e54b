"""Autoregressive generation: left-padded batches, a static or (with the CPU kernels) paged KV cache, greedy
or seeded sampling (glm3.runtime.sampling)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from mindspore import Tensor

from glm3.runtime.block_manager import DEFAULT_BLOCK_SIZE
from glm3.runtime.kv_cache import BlockCaches, PagedCacheSteps, StaticCacheSteps
from glm3.runtime.sampling import SamplingParams
from glm3.runtime.steps import DecodeStep, PagedDecodeStep, PagedPrefillStep, PerShapeStep, PrefillStep

# Prompts are left-padded to a multiple of this, and the cache to a multiple of CACHE_BUCKET, so that
# a handful of compiled graphs serve every prompt length.
PROMPT_BUCKET = 32
CACHE_BUCKET = 64


# model -> {(structure_version, kind, max_len): step}: a model's compiled steps, owned here, not by the model.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_STEP_KINDS = {
    "prefill": lambda model, max_len: PrefillStep(model, max_len),
    "decode": lambda model, max_len: PerShapeStep(lambda: DecodeStep(model, max_len)),
    "paged_prefill": lambda model, max_len: PagedPrefillStep(model),
    "paged_decode": lambda model, max_len: PerShapeStep(lambda: PagedDecodeStep(model)),
}


def compiled_step(model, kind: str, max_len: int = 0):
    """The model's step of `kind` ("prefill"/"decode" for a static cache of `max_len` positions,
    "paged_prefill"/"paged_decode" for block caches), built once and reused (graph mode compiles it at its first
    call with each new input shape). Steps of an older structure of the model (before LoRA was added or
    merged: GLM3ForCausalLM.structure_changed) are dropped."""
    steps = _STEPS.setdefault(model, {})
    key = (model.structure_version, kind, max_len)
    if key not in steps:
        for stale in [k for k in steps if k[0] != model.structure_version]:
            del steps[stale]
        steps[key] = _STEP_KINDS[kind](model, max_len)
    return steps[key]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def as_batch(input_ids, attention_mask=None, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalise ids (list, list of lists, numpy or Tensor) to int32 [batch, seq] plus a 0/1 mask.

    A list of unequal rows is left-padded here.
    """
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.asnumpy()
    if isinstance(input_ids, np.ndarray):
        ids = input_ids
    else:
        rows = list(input_ids)
        if rows and isinstance(rows[0], (int, np.integer)):
            rows = [rows]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("input_ids must hold at least one token per row")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        if attention_mask is None:
            attention_mask = mask
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones(ids.shape, dtype=np.int32)
    else:
        if isinstance(attention_mask, Tensor):
            attention_mask = attention_mask.asnumpy()
        mask = np.asarray(attention_mask).astype(np.int32)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if (mask.sum(axis=1) == 0).any():
        raise ValueError("every row needs at least one real token (attention_mask all zero)")
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("rows must be left-padded (attention_mask 0...0 1...1)")
    return ids.astype(np.int32), mask


def left_pad(ids: np.ndarray, mask: np.ndarray, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad a batch (and its mask) to `width` columns."""
    shift = width - ids.shape[1]
    return np.pad(ids, ((0, 0), (shift, 0)), constant_values=pad), np.pad(mask, ((0, 0), (shift, 0)))


def iter_generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the next token of every row ([batch] int64) until all rows stop or the budget is spent.

    Rows that have stopped yield pad_token_id. A row stops after emitting any of eos_token_id (default:
    the config's eos plus the model's stop_token_ids, i.e. <|user|> and <|observation|> when a tokenizer
    was loaded with the model).
    """
    config = model.config
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    ids, mask = as_batch(input_ids, attention_mask, pad)
    prompt_len = ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = (max_length - prompt_len) if max_length is not None else 20
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens} (prompt has {prompt_len} tokens)")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > config.seq_length:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"seq_length {config.seq_length}"
        )
    if (ids < 0).any() or (ids >= config.padded_vocab_size).any():
        raise ValueError(f"input_ids must be in [0, {config.padded_vocab_size})")
    sampling = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    if eos_token_id is None:
        eos_token_id = model.end_token_ids
    bucket = _round_up(prompt_len, PROMPT_BUCKET)
    max_len = _round_up(bucket + max_new_tokens, CACHE_BUCKET)
    yield from decode_loop(
        generation_steps(model, ids.shape[0], max_len),
        ids,
        mask,
        bucket,
        max_new_tokens,
        sampling,
        stop_ids=eos_token_id,
        pad=pad,
    )


def generation_steps(model, batch: int, max_len: int):
    """The cache steps of one generate() call: a paged cache when the model has the CPU kernels that write it in
    place and fuse a decoding layer's attention (the fastest decode here), else a static cache of max_len."""
    if model.paged_kernels is None:
        return StaticCacheSteps(
            compiled_step(model, "prefill", max_len), compiled_step(model, "decode", max_len), max_len
        )
    config = model.config
    per_row = -(-max_len // DEFAULT_BLOCK_SIZE)
    geometry = BlockCaches(
        config.num_layers, config.num_kv_groups, config.kv_channels, batch * per_row + 1, DEFAULT_BLOCK_SIZE
    )
    return PagedCacheSteps(
        compiled_step(model, "paged_prefill"), compiled_step(model, "paged_decode"), geometry, per_row
    )


def decode_loop(
    steps,
    ids: np.ndarray,
    mask: np.ndarray,
    prompt_slots: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    *,
    stop_ids,
    pad: int,
) -> Iterator[np.ndarray]:
    """The generation loop over a cache's steps (glm3.runtime.kv_cache.StaticCacheSteps or PagedCacheSteps, driving
    compiled Cells or loaded MindIR graphs): steps.start(ids, mask) and steps.step(tokens) return the logits
    [b, V] of the next token. Prompts are left-padded to prompt_slots here.
    """
    batch, prompt_len = ids.shape
    stops = {int(stop_ids)} if isinstance(stop_ids, (int, np.integer)) else {int(t) for t in stop_ids}
    stop_array = np.array(sorted(stops), dtype=np.int64)
    # One generator per row: a row's sample depends on the seed and its index, not on the rest of the batch.
    rngs = [sampling.generator(row) for row in range(batch)]
    logits = steps.start(*left_pad(ids, mask, prompt_slots, pad))
    history = np.concatenate([ids.astype(np.int64), np.zeros((batch, max_new_tokens), np.int64)], axis=1)
    history_mask = np.concatenate([mask, np.zeros((batch, max_new_tokens), np.int32)], axis=1)
    finished = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        tokens = sampling.choose(logits.asnumpy(), history, history_mask, rngs)
        tokens = np.where(finished, pad, tokens)
        history[:, prompt_len + step] = tokens
        history_mask[:, prompt_len + step] = ~finished
        finished = finished | np.isin(tokens, stop_array)
        yield tokens
        if finished.all() or step == max_new_tokens - 1:
            return
        logits = steps.step(tokens)


def generate(
    model, input_ids, attention_mask=None, *, streamer: Callable[[np.ndarray], None] | None = None, **kwargs
) -> np.ndarray:
    """Generate up to max_new_tokens (or up to max_length in total) for a batch of prompts.

    Returns int64 [batch, prompt_len + generated]: the prompts as given, then the new tokens; a row that
    stopped early (its stop token included) is filled with pad. streamer, if given, is called with each
    step's tokens ([batch]). Sampling with the same seed gives the same tokens.
    """
    pad = model.config.pad_token_id if kwargs.get("pad_token_id") is None else kwargs["pad_token_id"]
    ids, mask = as_batch(input_ids, attention_mask, pad)
    steps = []
    for tokens in iter_generate(model, ids, mask, **kwargs):
        steps.append(tokens)
        if streamer is not None:
            streamer(tokens)
    return np.concatenate([ids.astype(np.int64), np.stack(steps, axis=1)], axis=1)
