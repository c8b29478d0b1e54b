"""ADGEN loading and the two exact preprocessing formats, on the shipped sample and on the real ADGEN dev set."""

import json
import os

import numpy as np
import pytest

from conftest import ADGEN_DEV, SAMPLE
from glm3.data import AdgenError, PreprocessError, load_adgen, preprocess_eval, preprocess_train


def test_loader_formats_and_errors(tmp_path):
    records, report = load_adgen(SAMPLE)
    assert report.records == len(records) == 24 and not report.bad_lines
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records[:3], ensure_ascii=False), encoding="utf-8")
    assert load_adgen(array)[0] == records[:3]

    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"content": "a", "summary": "b"}\n{"content": "a", \n\n{"content": 1, "summary": "x"}\n'
        '{"content": "", "summary": "y"}\n',
        encoding="utf-8",
    )
    with pytest.raises(AdgenError, match=r"bad.json:2: invalid JSON"):
        load_adgen(bad)
    kept, report = load_adgen(bad, skip_bad_lines=True)
    assert len(kept) == 2 and report.bad_lines == [2, 4] and report.empty_content == 1
    assert "2 malformed line(s) skipped (first: line 2)" in report.describe()
    with pytest.raises(AdgenError, match="not found"):
        load_adgen(tmp_path / "missing.json")


def test_mindformers_v3_layout(tokenizer):
    gmask, sop, eos = tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), tokenizer.eos_id
    content, summary = "类型#裙*颜色#黑色", "黑色长裙优雅大方。"
    c, s = tokenizer.encode(content), tokenizer.encode(summary)
    (ex,), skipped = preprocess_train([{"content": content, "summary": summary}], tokenizer)
    assert skipped == 0 and ex.input_ids.shape == ex.labels.shape == (193,)
    n = 2 + len(c) + len(s) + 1
    assert ex.input_ids[:n].tolist() == [gmask, sop] + c + s + [eos]
    assert (ex.input_ids[n:] == 0).all()
    # labels[i] is the token after input_ids[i]: -100 over the prompt but its last token, then answer + eos.
    assert ex.labels[: 2 + len(c) - 1].tolist() == [-100] * (2 + len(c) - 1)
    assert ex.labels[2 + len(c) - 1 : n - 1].tolist() == s + [eos]
    assert (ex.labels[n - 1 :] == -100).all()
    (raw,), _ = preprocess_train([{"content": content, "summary": summary}], tokenizer, ignore_pad_token_for_loss=False)
    assert raw.labels[0] == 0 and raw.labels[-1] == 0


def test_truncation_seq_length_and_blank_records(tokenizer):
    long = {"content": "连衣裙" * 200, "summary": "很好看" * 300}
    (ex,), _ = preprocess_train([long], tokenizer, max_source_length=16, max_target_length=8, seq_length=25)
    assert ex.input_ids.shape == (25,) and ex.input_ids[24] == tokenizer.eos_id  # 16 prompt + 8 answer + eos
    assert (
        ex.input_ids[:16].tolist()
        == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + tokenizer.encode(long["content"])[:14]
    )
    for wrong in (100, 256):  # shorter, or longer (what was once silently ignored): the arithmetic, refused
        with pytest.raises(PreprocessError, match=f"seq_length {wrong} must equal .* = 64 \\+ 128 \\+ 1 = 193"):
            preprocess_train([long], tokenizer, seq_length=wrong)
    examples, skipped = preprocess_train(
        [long, {"content": " ", "summary": "x"}, {"content": "x", "summary": ""}], tokenizer
    )
    assert len(examples) == 1 and skipped == 2


def test_chat_template_trains_only_the_reply(tokenizer):
    record = {"content": "类型#上衣*颜色#白色", "summary": "白色上衣清爽百搭。"}
    (ex,), _ = preprocess_train([record], tokenizer, style="chat")
    ids = ex.input_ids.tolist()
    assistant = ids.index(tokenizer.get_command("<|assistant|>"))
    # The prompt is exactly what chat inference feeds the model for this query.
    assert ids[: assistant + 1] == list(tokenizer.build_chat_input(record["content"])["input_ids"][0])
    reply = tokenizer.encode("\n") + tokenizer.encode(record["summary"]) + [tokenizer.eos_id]
    assert ids[assistant + 1 : assistant + 1 + len(reply)] == reply
    supervised = [i for i, t in enumerate(ex.labels) if t != -100]
    assert supervised == list(range(assistant, assistant + len(reply)))
    assert [ex.labels[i] for i in supervised] == reply
    (prompt,), _ = preprocess_eval([record], tokenizer, style="chat")
    assert prompt.prompt_ids == ids[: assistant + 1] and prompt.reference == record["summary"]


def test_real_adgen_dev_set(tokenizer):
    assert os.path.isfile(ADGEN_DEV), f"ADGEN dev set not found at {ADGEN_DEV} (set GLM3_ADGEN_DEV)"
    records, report = load_adgen(ADGEN_DEV)
    assert report.records == 1070 and not report.bad_lines
    examples, skipped = preprocess_train(records, tokenizer)
    assert len(examples) + skipped == 1070
    inputs = np.stack([e.input_ids for e in examples])
    labels = np.stack([e.labels for e in examples])
    assert inputs.shape == (len(examples), 193)
    # Everywhere a label is supervised, it is the next input token (the shift), and every row ends in eos.
    mask = labels[:, :-1] != -100
    assert (labels[:, :-1][mask] == inputs[:, 1:][mask]).all()
    assert ((inputs == tokenizer.eos_id).sum(axis=1) >= 1).all()
    evals, _ = preprocess_eval(records, tokenizer)
    assert all(len(e.prompt_ids) <= 64 for e in evals) and evals[0].reference == records[0]["summary"]


def _cache(tokenizer, cache_dir, data=SAMPLE, **overrides):
    from glm3.data.mindrecord import build_train_cache

    params = {"max_source_length": 32, "max_target_length": 32, "seq_length": 65, **overrides}
    return build_train_cache(data, tokenizer, cache_dir, **params)


def test_mindrecord_cache_holds_the_preprocessed_examples_and_is_reused(tokenizer, tmp_path):
    from glm3.data.mindrecord import read_examples

    built = _cache(tokenizer, tmp_path / "cache")
    assert built.built and built.num_examples == 24 and built.seq_length == 65
    records, _ = load_adgen(SAMPLE)
    expected, _ = preprocess_train(records, tokenizer, 32, 32, 65)
    stored = read_examples(built.path)
    np.testing.assert_array_equal(stored["input_ids"], np.stack([e.input_ids for e in expected]))
    np.testing.assert_array_equal(stored["labels"], np.stack([e.labels for e in expected]))

    mtime = os.path.getmtime(built.path)
    again = _cache(tokenizer, tmp_path / "cache")
    assert not again.built and again.path == built.path and os.path.getmtime(built.path) == mtime
    # Any change of what decides the content gives a new cache beside the old one.
    other_params = _cache(tokenizer, tmp_path / "cache", max_target_length=16, seq_length=49)
    other_style = _cache(tokenizer, tmp_path / "cache", style="chat")
    edited = tmp_path / "edited.json"
    edited.write_text(open(SAMPLE, encoding="utf-8").read().replace("蓝色", "白色", 1), encoding="utf-8")
    other_data = _cache(tokenizer, tmp_path / "cache", data=edited)
    keys = {built.key, other_params.key, other_style.key, other_data.key}
    assert len(keys) == 4 and all(c.built for c in (other_params, other_style, other_data))
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(keys)  # no temporary directories left


def test_malformed_data_makes_no_cache(tokenizer, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"content": "a", "summary": "b"}\n{"content": oops}\n', encoding="utf-8")
    with pytest.raises(AdgenError, match=r"bad.json:2"):
        _cache(tokenizer, tmp_path / "cache", data=bad)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def _order(data, **kwargs):
    from glm3.data.mindrecord import read_examples, train_dataset

    rows = {r.tobytes(): i for i, r in enumerate(read_examples(data.path)["input_ids"])}
    dataset = train_dataset(data, 2, **kwargs)
    return [
        [rows[r.tobytes()] for r in ids] for ids, _ in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    ]


def test_dataset_shards_shuffles_by_seed_and_epoch_and_resumes(tokenizer, tmp_path):
    data = _cache(tokenizer, tmp_path / "cache")
    assert _order(data, shuffle=False) == [[2 * i, 2 * i + 1] for i in range(12)]
    rank0 = _order(data, seed=3, num_shards=2, shard_id=0)
    rank1 = _order(data, seed=3, num_shards=2, shard_id=1)
    assert len(rank0) == len(rank1) == 6
    seen0, seen1 = {i for b in rank0 for i in b}, {i for b in rank1 for i in b}
    assert not seen0 & seen1 and seen0 | seen1 == set(range(24))  # disjoint shards covering the data
    assert _order(data, seed=3, num_shards=2, shard_id=0) == rank0  # the seed fixes the order
    assert _order(data, seed=3, epoch=1, num_shards=2, shard_id=0) != rank0  # each epoch reshuffles
    assert _order(data, seed=4, num_shards=2, shard_id=0) != rank0
    assert _order(data, seed=3, num_shards=2, shard_id=0, skip_batches=4) == rank0[4:]


def test_dataset_drops_the_last_partial_batch(tokenizer, tmp_path):
    from glm3.data.mindrecord import batches_per_epoch, train_dataset

    data = _cache(tokenizer, tmp_path / "cache")
    dataset = train_dataset(data, 5, seed=0)
    sizes = [ids.shape[0] for ids, _ in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)]
    assert sizes == [5, 5, 5, 5] == [5] * batches_per_epoch(24, 5)
    assert batches_per_epoch(24, 5, num_shards=2) == 2 and batches_per_epoch(24, 13, num_shards=2) == 0
