"""The serving engine on real tiny models: continuous batching, rows that do not depend on the batch (bit for
bit), swapping when blocks run out, the queue bound, aborts, finish reasons."""

import threading

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import write_scripted_model
from glm3.deploy.export import export_model
from glm3.runtime.engine import BackgroundEngine, EngineConfig
from glm3.runtime.kv_cache_manager import CacheConfig
from glm3.runtime.sampling import SamplingParams
from glm3.runtime.scheduler import QueueFull
from glm3.serve.engines import load_engine

GREEDY = SamplingParams()
SEEDED = SamplingParams(do_sample=True, temperature=0.9, top_p=0.9, seed=123)


def prompts(tokenizer, count, seed=0):
    rng = np.random.default_rng(seed)
    chars = list("你好世界今天天气怎么样我们一起去公园玩吧面料显瘦")
    return [
        tokenizer.build_chat_input("".join(rng.choice(chars, int(rng.integers(2, 30)))))["input_ids"][0]
        for _ in range(count)
    ]


def run(engine, batch, sampling, max_tokens=24):
    seqs = [engine.add(p, sampling, max_tokens) for p in batch]
    while engine.has_work():
        engine.step()
    return [s.output for s in seqs]


@pytest.fixture(scope="module")
def _eager(tiny_dir):
    return load_engine(tiny_dir, EngineConfig())


@pytest.fixture
def eager(_eager):
    """The module's eager engine (compiled once), empty and at zero for each test, whatever ran before."""
    _eager[0].reset()
    return _eager


@pytest.fixture(scope="module")
def paged_export(tiny_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "paged"
    export_model(tiny_dir, directory, batch_size=None, prompt_length=48, seq_length=256, paged=True)
    return str(directory)


def decode_rows_alone_and_together(engine, tokenizer):
    """Logits of one decode step for 12 sequences: each alone, then in batches of every size and order (the
    blocks allocated by the engine's KV-cache manager, the steps run by its model runner)."""
    runner, kv = engine.runner, engine.scheduler.kv
    batch = prompts(tokenizer, 12, seed=1)
    ids = list(range(1000, 1012))
    first = []
    for i, p in zip(ids, batch):
        kv.allocate(i, len(p))
        first.append(int(runner.prefill([p], [kv.tables[i]])[0].argmax()))
    for i in ids:
        kv.append_slots(i)
    position = {i: len(p) for i, p in zip(ids, batch)}

    def decode(seqs, tokens):
        return runner.decode(tokens, [position[i] for i in seqs], [kv.tables[i] for i in seqs])

    alone = [decode([i], [t])[0] for i, t in zip(ids, first)]
    together = [decode(ids, first), decode(ids[::-1], first[::-1])[::-1]]
    together += [np.concatenate([decode(ids[k : k + 3], first[k : k + 3]) for k in range(0, 12, 3)])]
    for i in ids:
        kv.free(i)
    return np.stack(alone), together


def test_a_rows_decode_logits_are_the_same_bits_alone_or_in_any_batch(eager, tokenizer):
    engine, _ = eager
    assert engine.runner.shapes.decode_widths == (1, 2, 4, 8, 16)  # the CPU kernels: every width, the same bits
    alone, together = decode_rows_alone_and_together(engine, tokenizer)
    assert np.abs(alone).max() > 0 and len(set(alone.argmax(-1).tolist())) > 1
    for logits in together:
        np.testing.assert_array_equal(logits, alone)


def test_the_paged_export_decodes_at_one_width_and_its_rows_are_the_same_bits(paged_export, tokenizer):
    engine, _ = load_engine(paged_export, EngineConfig(max_num_seqs=8))
    # MindSpore's MatMul rounds differently for different row counts: an export decodes at one fixed width.
    assert engine.runner.shapes.decode_widths == (8,) and engine.runner.shapes.table_width == 16
    alone, together = decode_rows_alone_and_together(engine, tokenizer)
    for logits in together:
        np.testing.assert_array_equal(logits, alone)


def test_sixteen_requests_together_give_each_the_tokens_it_gets_alone(eager, tokenizer):
    engine, _ = eager
    batch = prompts(tokenizer, 16)
    for sampling in (GREEDY, SEEDED):
        together = run(engine, batch, sampling)
        assert engine.peak_decode_batch == 16
        alone = [run(engine, [p], sampling)[0] for p in batch]
        assert together == alone
        assert sum(map(len, alone)) > 16 * 12 and len({tuple(out) for out in alone}) == 16
    assert engine.stats()["free_blocks"] == engine.scheduler.kv.usable_blocks


def test_the_engine_decodes_what_a_full_forward_of_every_step_predicts(eager, tiny_model, tokenizer):
    """Paged decoding with the CPU kernels (the cache written in place) against an independent reference: the
    plain model run over the whole text at every step, no cache at all. Each served token is the reference's
    most likely one (within float noise of the maximum, so a near-tie cannot fail it), for 30 tokens."""
    engine, _ = eager
    assert engine.runner.decode_step.in_place  # the path under test
    batch = prompts(tokenizer, 4, seed=4)
    served = run(engine, batch, GREEDY, max_tokens=30)
    for prompt, out in zip(batch, served):
        assert len(out) == 30
        for k, token in enumerate(out):
            logits = tiny_model(Tensor([prompt + out[:k]], ms.int32)).asnumpy()[0, -1]
            assert logits[token] >= logits.max() - 1e-4, (k, token, int(logits.argmax()))


def test_out_of_blocks_sequences_swap_out_and_back_and_their_tokens_do_not_change(tiny_dir, eager, tokenizer):
    roomy, _ = eager
    tight, _ = load_engine(
        tiny_dir, EngineConfig(max_num_seqs=16, cache=CacheConfig(num_blocks=8))
    )  # 7 usable blocks, 112 tokens
    batch = prompts(tokenizer, 10, seed=2)
    for sampling in (GREEDY, SEEDED):
        assert run(tight, batch, sampling, max_tokens=40) == run(roomy, batch, sampling, max_tokens=40)
    stats = tight.stats()
    assert stats["preemptions"] > 0 and stats["free_blocks"] == 7 and stats["swapped"] == 0


def test_requests_beyond_the_queue_bound_or_the_cache_are_refused(tiny_dir, tokenizer):
    engine, _ = load_engine(tiny_dir, EngineConfig(max_num_seqs=1, max_queue=2, cache=CacheConfig(num_blocks=4)))
    prompt = prompts(tokenizer, 1)[0]
    engine.add(prompt, GREEDY, 4)
    engine.add(prompt, GREEDY, 4)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.add(prompt, GREEDY, 4)
    with pytest.raises(ValueError, match="the KV cache holds 48 tokens \\(3 usable blocks of 16\\)"):
        engine.check_prompt(prompt, 48)
    with pytest.raises(ValueError, match="at most"):
        engine.check_prompt(list(range(50)), None)
    assert engine.check_prompt(prompt, None) == 48 - len(prompt)  # no max_tokens: what the cache holds
    while engine.has_work():
        assert len(engine.step()) <= 1  # max_num_seqs 1: one sequence at a time
    assert engine.stats()["free_blocks"] == 3


def test_an_aborted_sequence_leaves_at_the_next_boundary_waiting_running_or_swapped(tiny_dir, tokenizer):
    engine, _ = load_engine(tiny_dir, EngineConfig(max_num_seqs=2, cache=CacheConfig(num_blocks=6)))
    events = []
    a, b, c = (engine.add(p, GREEDY, None, listener=events.append) for p in prompts(tokenizer, 3, seed=3))
    engine.step()  # a and b prefilled; c waits
    assert (a.status, b.status, c.status) == ("running", "running", "waiting")
    engine.abort(c)
    engine.step()
    assert c.status == "finished" and c.finish_reason == "abort" and c.output == []
    while b.status != "swapped" and engine.has_work():
        engine.step()
    assert b.status == "swapped" and b.swapped is not None
    engine.abort(b)
    engine.abort(a)
    engine.step()
    assert a.finish_reason == b.finish_reason == "abort" and b.swapped is None and not engine.has_work()
    assert engine.stats()["free_blocks"] == 5
    ends = [e for e in events if e.finish_reason is not None]
    assert sorted(e.seq.seq_id for e in ends) == sorted([a.seq_id, b.seq_id, c.seq_id])
    assert all(e.token is None for e in ends)


def test_a_stop_token_ends_a_sequence_with_stop_and_max_tokens_with_length(tiny_dir, tokenizer, tmp_path):
    script = [
        tokenizer.get_command("<|assistant|>"),
        tokenizer.sp.piece_to_id("<0x0A>"),
        tokenizer.sp.piece_to_id("好"),
        tokenizer.eos_id,
    ]
    engine, _ = load_engine(write_scripted_model(tiny_dir, script, tmp_path / "scripted"), EngineConfig())
    prompt = tokenizer.build_chat_input("写一个字")["input_ids"][0]
    stop, length = engine.add(prompt, GREEDY, 10), engine.add(prompt, GREEDY, 2)
    while engine.has_work():
        engine.step()
    assert stop.output == script[1:] and stop.finish_reason == "stop"
    assert length.output == script[1:3] and length.finish_reason == "length"


def test_a_failing_step_fails_its_sequences_and_the_engine_serves_on(tiny_dir, tokenizer):
    """Faults injected into the model runner (a decode that raises) and the scheduler (a step that raises)."""
    engine, _ = load_engine(tiny_dir, EngineConfig())
    background = BackgroundEngine(engine)
    batch = prompts(tokenizer, 3, seed=5)
    try:

        def served(prompt, max_tokens=8):
            done = threading.Event()
            events = []
            engine_seq = background.add(
                prompt, GREEDY, max_tokens, lambda e: (events.append(e), e.finish_reason and done.set())
            )
            assert done.wait(60)
            return engine_seq, events

        decode = engine.runner.decode
        engine.runner.decode = lambda *args: (_ for _ in ()).throw(RuntimeError("injected decode failure"))
        seq, events = served(batch[0])
        assert events[-1].finish_reason == "error" and "injected decode failure" in events[-1].error
        assert len(seq.output) == 1  # the prefill's token, then the failed decode
        engine.runner.decode = decode
        schedule = engine.scheduler.schedule
        engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("injected scheduler failure"))
        seq, events = served(batch[1])
        assert [e.finish_reason for e in events] == ["error"] and "injected scheduler failure" in events[0].error
        engine.scheduler.schedule = schedule
        seq, events = served(batch[2])
        assert seq.finish_reason == "length" and len(seq.output) == 8 and background.alive
        assert engine.stats()["free_blocks"] == engine.scheduler.kv.usable_blocks
    finally:
        background.close()
