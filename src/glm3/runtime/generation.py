"""Autoregressive generation of a batch of prompts (left-padded or ragged): greedy or seeded sampling
(glm3.runtime.sampling), through the engine (glm3.runtime.engine) over a static cache or, with the CPU kernels
that write it in place and fuse a decoding layer's attention (the fastest decode here), a paged one."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from mindspore import Tensor

from glm3.runtime.kv_cache_manager import DEFAULT_BLOCK_SIZE, CacheConfig, KVCacheManager
from glm3.runtime.model_runner import PROMPT_BUCKET, CacheGeometry, PagedRunner, StaticRunner, StepShapes, round_up
from glm3.runtime.sampling import SamplingParams
from glm3.runtime.steps import compiled_step

# The static cache of a generate() call is a multiple of this long, so that few compiled graphs serve every
# prompt and budget.
CACHE_BUCKET = 64


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
    stops = {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(t) for t in eos_token_id}
    batch = ids.shape[0]
    prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    engine = generation_engine(model, batch, round_up(prompt_len, PROMPT_BUCKET) + max_new_tokens, pad)
    seqs = [
        engine.add(p, sampling, max_new_tokens, stop_ids=stops, generator_index=row) for row, p in enumerate(prompts)
    ]
    rows = {seq.seq_id: row for row, seq in enumerate(seqs)}
    while engine.has_work():
        tokens = np.full(batch, pad, np.int64)
        for event in engine.step():
            if event.token is not None:
                tokens[rows[event.seq.seq_id]] = event.token
        yield tokens


def generation_engine(model, batch: int, tokens: int, pad: int = 0):
    """The engine of one generate() call: `batch` rows of up to `tokens` tokens (the padded prompt and the new
    tokens), all admitted at once. A paged cache when the model has the CPU kernels, else a static one."""
    from glm3.runtime.engine import Engine, EngineConfig, ModelLimits

    c = model.config
    max_len = round_up(tokens, CACHE_BUCKET)
    limits = ModelLimits(c.seq_length, c.seq_length - 1, c.padded_vocab_size, frozenset(model.end_token_ids))
    if model.paged_kernels is None:
        runner = StaticRunner(
            compiled_step(model, "prefill", max_len), compiled_step(model, "decode", max_len), max_len, batch, pad=pad
        )
        kv = KVCacheManager(batch, max_len, max_blocks_per_seq=1)
        cache = None
    else:
        per_row = -(-max_len // DEFAULT_BLOCK_SIZE)
        cache = CacheConfig(batch * per_row + 1, DEFAULT_BLOCK_SIZE)
        geometry = CacheGeometry(c.num_layers, c.num_kv_groups, c.kv_channels, cache)
        shapes = StepShapes(per_row, together=True, decode_widths=(batch,), table_width=per_row)
        runner = PagedRunner(
            compiled_step(model, "paged_prefill"), compiled_step(model, "paged_decode"), geometry, shapes, pad
        )
        kv = KVCacheManager.paged(cache, per_row)
    config = EngineConfig(max_num_seqs=batch, max_queue=batch, **({"cache": cache} if cache else {}))
    return Engine(runner, limits, config, kv=kv, raise_errors=True)


def run_batch(engine, prompts, sampling: SamplingParams, max_tokens: int, indices=None, stop_ids=None) -> list:
    """Every prompt through `engine` to its end (their sequences, outputs complete); indices: each one's
    sampling generator index (default: its position in `prompts`); stop_ids: default the model's."""
    indices = range(len(prompts)) if indices is None else indices
    seqs = [engine.add(p, sampling, max_tokens, stop_ids=stop_ids, generator_index=i) for p, i in zip(prompts, indices)]
    while engine.has_work():
        engine.step()
    return seqs


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
