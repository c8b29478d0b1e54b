"""MindIR export (prefill + decode graphs, KV cache as graph inputs/outputs) and the MindIR runner, against the
eager model, token for token."""

import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

import glm3
from glm3.deploy.export import ExportConfig, ExportError, export_model
from glm3.deploy.infer import PROMPT_MARKER, MindIRRunner

PROMPTS = ["这款连衣裙", "Hello there, how are you", "黑色长裙优雅大方"]


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "static": export_model(tiny_dir, root / "static", batch_size=2, prompt_length=32, seq_length=96),
        "dynamic": export_model(tiny_dir, root / "dynamic", batch_size=None, prompt_length=32, seq_length=96),
        "paged": export_model(
            tiny_dir,
            root / "paged",
            batch_size=None,
            prompt_length=32,
            seq_length=96,
            paged=True,
            block_size=16,
            num_blocks=24,
        ),
    }


def prompt_rows(tokenizer):
    return [[tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + tokenizer.encode(p) for p in PROMPTS]


def eager_tokens(model, tokenizer, rows, **kwargs):
    """New tokens per prompt from the eager model, each prompt alone, cut after the first stop token."""
    out = []
    for row in rows:
        new = glm3.generate(model, [row], max_new_tokens=12, **kwargs)[0, len(row) :].tolist()
        stop = next((i for i, t in enumerate(new) if t in {tokenizer.eos_id, *model.stop_token_ids}), None)
        out.append(new if stop is None else new[: stop + 1])
    return out


@pytest.mark.parametrize("kind", ["static", "dynamic", "paged"])
def test_runner_matches_the_eager_model_token_for_token(exports, kind, tiny_model, tokenizer):
    runner = MindIRRunner(exports[kind])
    assert runner.backend in ("GraphCell", "mindspore_lite")
    rows = prompt_rows(tokenizer)
    assert runner.generate(rows, max_new_tokens=12) == eager_tokens(tiny_model, tokenizer, rows)
    sampled = runner.generate(rows[:1], max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.8, seed=3)
    assert sampled == eager_tokens(tiny_model, tokenizer, rows[:1], do_sample=True, temperature=0.8, top_p=0.8, seed=3)


def test_exported_graphs_compute_the_eager_logits(exports, tiny_model):
    runner = MindIRRunner(exports["dynamic"])
    ids = np.zeros((3, 32), np.int32)
    ids[:, -5:] = [[64790 % 2048, 5, 6, 7, 8]] * 3
    mask = (ids != 0).astype(np.int32)
    logits, caches = runner.prefill(Tensor(ids), Tensor(mask))
    eager = tiny_model(Tensor(ids[:, -5:])).asnumpy()[:, -1]
    np.testing.assert_allclose(logits.asnumpy(), eager, atol=1e-5)
    config = ExportConfig.load(exports["dynamic"])
    assert len(caches) == 2 * config.num_layers and caches[0].shape == (3, config.kv_groups, 96, config.head_dim)


def test_a_paged_export_short_of_blocks_queues_the_prompts_it_cannot_hold_yet(exports, tokenizer):
    """24 blocks of 16: the scratch block and room for 3 of these 9 sequences at a time. The engine admits what
    fits, the rest wait (and running ones swap out when they grow), and every prompt gets its tokens."""
    runner = MindIRRunner(exports["paged"])
    rows = prompt_rows(tokenizer) * 3
    waves = runner.generate(rows, max_new_tokens=60)
    assert waves == runner.generate(rows[:3], max_new_tokens=60) * 3
    assert [len(out) for out in waves[:3]] != [0, 0, 0] and max(len(out) for out in waves) > 16


def test_bad_inputs(exports, tiny_dir, tmp_path, tokenizer):
    runner = MindIRRunner(exports["static"])
    with pytest.raises(ExportError, match="at most 32"):
        runner.generate([[5] * 40])
    with pytest.raises(ExportError, match="exceeds the exported cache"):
        runner.generate([[5, 6]], max_new_tokens=80)
    with pytest.raises(ExportError, match="not an exported model"):
        MindIRRunner(tiny_dir)
    with pytest.raises(ExportError, match="prompt_length"):
        export_model(tiny_dir, tmp_path / "x", prompt_length=200, seq_length=100)
    assert not (tmp_path / "x").exists()


def test_cli_export_and_interactive_infer(tiny_dir, tmp_path):
    glm3_cli = [sys.executable, "-m", "glm3.cli"]
    done = subprocess.run(
        [
            *glm3_cli,
            "export",
            "--model",
            tiny_dir,
            "--dst",
            str(tmp_path / "exp"),
            "--dynamic-batch",
            "--prompt-length",
            "32",
            "--seq-length",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    session = subprocess.run(
        [*glm3_cli, "infer", "--model", str(tmp_path / "exp"), "--max-new-tokens", "4"],
        input="你好\n\nexit\nnot read\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert session.returncode == 0, session.stderr[-2000:]
    lines = session.stdout.splitlines()
    assert lines[0] == PROMPT_MARKER and lines.count(PROMPT_MARKER) == 3 and "not read" not in session.stdout
    batch = subprocess.run(
        [
            *glm3_cli,
            "infer",
            "--model",
            str(tmp_path / "exp"),
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--json",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert batch.returncode == 0 and len(batch.stdout.splitlines()) == 2


def test_fused_paged_attention_export_emits_the_lite_operator(tiny_dir, tmp_path):
    plain = export_model(
        tiny_dir, tmp_path / "plain", batch_size=1, prompt_length=16, seq_length=64, paged=True, num_blocks=8
    )
    fused = export_model(
        tiny_dir,
        tmp_path / "fused",
        batch_size=1,
        prompt_length=16,
        seq_length=64,
        paged=True,
        num_blocks=8,
        fused_paged_attention=True,
    )
    assert b"PagedAttention" in (tmp_path / "fused" / "decode.mindir").read_bytes()
    assert b"PagedAttention" not in (tmp_path / "plain" / "decode.mindir").read_bytes()
    assert ExportConfig.load(fused).fused_paged_attention and not ExportConfig.load(plain).fused_paged_attention
    with pytest.raises(ExportError, match="only MindSpore Lite"):
        MindIRRunner(fused)
    with pytest.raises(ExportError, match="needs a paged export"):
        export_model(tiny_dir, tmp_path / "x", fused_paged_attention=True)


def test_weights_are_stored_once_beside_weightless_graphs(tiny_dir, tmp_path, tokenizer):
    from glm3.weights.convert import convert_checkpoint

    model = convert_checkpoint(tiny_dir, tmp_path / "ms", progress=False).dst  # our layout: linked, not copied
    out = export_model(model, tmp_path / "exp", batch_size=1, prompt_length=32, seq_length=64)
    config = ExportConfig.load(out)
    assert config.weights == "inputs" and config.dtype == "float32" and len(config.weight_names) == 17
    weights = tmp_path / "ms" / "mindspore_model.ckpt"
    assert os.stat(tmp_path / "exp" / "mindspore_model.ckpt").st_ino == os.stat(weights).st_ino
    for graph in ("prefill.mindir", "decode.mindir"):  # the graphs hold no weight data
        assert os.path.getsize(tmp_path / "exp" / graph) < os.path.getsize(weights) / 4
    row = prompt_rows(tokenizer)[:1]
    assert MindIRRunner(out).generate(row, max_new_tokens=8) == MindIRRunner(
        export_model(model, tmp_path / "emb", batch_size=1, prompt_length=32, seq_length=64, weights="embedded")
    ).generate(row, max_new_tokens=8)


def test_an_embedded_export_above_mindspores_single_file_size_uses_external_weight_data(
    tiny_dir, tmp_path, monkeypatch, tiny_model, tokenizer
):
    import mindspore.train.serialization as serialization

    # MindSpore writes <graph>_graph.mindir + <graph>_variables/ above 1 GiB of weights; lower its threshold so
    # the tiny model takes that path (the 6B float16 export is 12.5 GB).
    monkeypatch.setattr(serialization, "TOTAL_SAVE", 1)
    out = export_model(tiny_dir, tmp_path / "big", batch_size=None, prompt_length=32, seq_length=64, weights="embedded")
    names = set(os.listdir(out))
    assert {"prefill_graph.mindir", "decode_graph.mindir", "prefill_variables", "decode_variables"} <= names
    rows = prompt_rows(tokenizer)
    assert MindIRRunner(out).generate(rows, max_new_tokens=6) == [
        t[:6] for t in eager_tokens(tiny_model, tokenizer, rows)
    ]


def test_two_exports_of_one_model_are_the_same_bytes(tiny_dir, tmp_path):
    """A repeated export (a forced `dvc repro`) writes the same files: MindSpore names a node bound to several
    variables after all of them in an order that changes from process to process, which the export hook
    sorts. Each export runs in a process of its own, as each stage does."""
    digests = []
    for run in ("a", "b", "c"):
        dst = tmp_path / run
        done = subprocess.run(
            [sys.executable, "-m", "glm3.cli", "export", "--model", tiny_dir, "--dst", str(dst), "--paged"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        graphs = sorted(p.name for p in dst.glob("*.mindir"))
        assert graphs == ["decode.mindir", "prefill.mindir"]
        digests.append({name: (dst / name).read_bytes() for name in graphs})
        assert b"$" in digests[-1]["decode.mindir"]  # nodes with several variable names are there to be sorted
    assert digests[0] == digests[1] == digests[2]
