"""Tokenized training data cached as MindRecord, and the MindSpore dataset pipeline that reads it.

The cache directory is named by a key over everything that decides its content: the data file's bytes,
the tokenizer's SentencePiece model and the preprocessing parameters. A re-run with the same inputs finds
it and tokenizes nothing; a change to any of them builds a new one beside it. A cache appears whole or
not at all (built in a temporary directory, then renamed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from glm3.data.adgen import load_adgen
from glm3.data.preprocess import preprocess_train
from glm3.io import atomic_directory
from glm3.modeling.tokenizer import ChatGLM3Tokenizer

MINDRECORD = "train.mindrecord"
META = "meta.json"
COLUMNS = ("input_ids", "labels")


@dataclasses.dataclass
class TrainData:
    """A MindRecord cache of fixed-length training examples."""

    path: str  # the .mindrecord file
    num_examples: int
    seq_length: int
    skipped: int  # records without content or summary
    key: str
    built: bool  # False when an existing cache was reused
    bad_lines: int = 0  # malformed lines skipped (skip_bad_lines)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(data_path: str | os.PathLike, tokenizer: ChatGLM3Tokenizer, **preprocess) -> str:
    payload = json.dumps(
        {"data": _sha256_file(os.fspath(data_path)), "tokenizer": tokenizer.fingerprint(), "preprocess": preprocess},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def build_train_cache(
    data_path: str | os.PathLike,
    tokenizer: ChatGLM3Tokenizer,
    cache_dir: str | os.PathLike,
    max_source_length: int = 64,
    max_target_length: int = 128,
    seq_length: int = 193,
    style: str = "mindformers_v3",
    ignore_pad_token_for_loss: bool = True,
    skip_bad_lines: bool = False,
) -> TrainData:
    """Tokenize an ADGEN file into `cache_dir/<key>/train.mindrecord`, or reuse the cache already there."""
    from mindspore.mindrecord import FileWriter

    params = {
        "max_source_length": max_source_length,
        "max_target_length": max_target_length,
        "seq_length": seq_length,
        "style": style,
        "ignore_pad_token_for_loss": ignore_pad_token_for_loss,
        "skip_bad_lines": skip_bad_lines,
    }
    key = cache_key(data_path, tokenizer, **params)
    directory = os.path.join(os.fspath(cache_dir), key)
    meta_path = os.path.join(directory, META)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        return TrainData(
            os.path.join(directory, MINDRECORD),
            meta["num_examples"],
            meta["example_length"],
            meta["skipped"],
            key,
            built=False,
            bad_lines=meta.get("bad_lines", 0),
        )
    records, report = load_adgen(data_path, skip_bad_lines=skip_bad_lines)
    examples, skipped = preprocess_train(
        records, tokenizer, max_source_length, max_target_length, seq_length, style, ignore_pad_token_for_loss
    )
    if not examples:
        raise ValueError(f"{data_path}: no usable training examples ({report.describe()})")
    length = len(examples[0].input_ids)
    with atomic_directory(directory, overwrite=True) as tmp:
        writer = FileWriter(os.path.join(tmp, MINDRECORD), shard_num=1, overwrite=True)
        writer.add_schema({name: {"type": "int32", "shape": [-1]} for name in COLUMNS}, "adgen")
        writer.write_raw_data([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
        writer.commit()
        meta = {
            "num_examples": len(examples),
            "example_length": length,
            "skipped": skipped,
            "bad_lines": len(report.bad_lines),
            "source": os.path.abspath(os.fspath(data_path)),
            "load_report": report.describe(),
            "tokenizer": tokenizer.fingerprint(),
            **params,
        }
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
    return TrainData(
        os.path.join(directory, MINDRECORD),
        len(examples),
        length,
        skipped,
        key,
        built=True,
        bad_lines=len(report.bad_lines),
    )


def batches_per_epoch(num_examples: int, batch_size: int, num_shards: int = 1) -> int:
    """Batches each rank reads per epoch (MindSpore pads shards to equal size; the last partial batch is dropped)."""
    per_shard = -(-num_examples // num_shards)
    return per_shard // batch_size


def train_dataset(
    data: TrainData | str,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    num_shards: int = 1,
    shard_id: int = 0,
    skip_batches: int = 0,
):
    """A MindSpore dataset of (input_ids, labels) int32 batches for one epoch of one rank.

    The order depends only on (seed, epoch): every epoch is reshuffled, every rank reads its own shard,
    the last partial batch is dropped, and `skip_batches` resumes part-way through the epoch.
    """
    import mindspore.dataset as ds

    path = data.path if isinstance(data, TrainData) else data
    sampler = ds.DistributedSampler(num_shards, shard_id, shuffle=shuffle)
    sampler.seed = (seed * 1000003 + epoch) % (2**32)  # else it takes the process-global dataset seed
    dataset = ds.MindDataset(path, columns_list=list(COLUMNS), sampler=sampler)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    return dataset


def read_examples(path: str) -> dict[str, np.ndarray]:
    """All examples of a cache in file order (for checks and tests)."""
    from mindspore.mindrecord import FileReader

    reader = FileReader(path)
    rows = list(reader.get_next())
    reader.close()
    return {name: np.stack([np.asarray(r[name]) for r in rows]) for name in COLUMNS}
