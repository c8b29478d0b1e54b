"""The glm3 command line, run as real subprocesses."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from conftest import hf_config, hf_weights
from reference_torch import forward

GLM3 = [sys.executable, "-m", "glm3.cli"]


def run(*args, stdin=None, check=True):
    result = subprocess.run([*GLM3, *args], input=stdin, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_help_lists_commands():
    out = run("--help").stdout
    for command in (
        "chat",
        "generate",
        "score",
        "download",
        "convert",
        "train-tokenizer",
        "finetune",
        "rank-table",
        "merge",
        "split",
        "strategy",
        "export",
        "infer",
        "eval",
    ):
        assert command in out
    assert "--synthetic" in run("download", "--help").stdout and "--to" in run("convert", "--help").stdout


def _commands(parser, name="glm3"):
    """(command name, its parser) for every command and subcommand of the CLI."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def test_every_flag_of_every_command_has_help():
    from glm3.cli import build_parser

    commands = dict(_commands(build_parser()))
    assert len(commands) >= 20 and "glm3 eval ceval" in commands and "glm3 prefect up" in commands
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if action.dest != "help" and not (action.help or "").strip()
    ]
    assert undocumented == []


def test_download_synthetic_convert_then_score_generate_chat(tmp_path):
    """The offline path of a fresh clone: download --synthetic, convert, then use the MindSpore directory."""
    hf = tmp_path / "hf"
    run("download", "--synthetic", "tiny", "--dst", str(hf), "--format", "bin", "--seed", "5")
    assert sorted(os.listdir(hf)) == [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    again = run("download", "--synthetic", "tiny", "--dst", str(hf), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    model = tmp_path / "ms"
    out = run("convert", "--src", str(hf), "--dst", str(model), "--summary", str(tmp_path / "summary.json"))
    assert "converted 17 tensors" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"] == ["mindspore_model.ckpt"] and summary["dtype"] == "float32"

    ids = [1501, 1503, 17, 300, 42]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    run("score", "--model", str(model), "--ids", str(tmp_path / "ids.json"), "--out", str(tmp_path / "s.npz"))
    scored = np.load(tmp_path / "s.npz")
    expected = forward(hf_weights(hf), hf_config(hf), ids).numpy()
    np.testing.assert_allclose(scored["logits"][0], expected, atol=1e-4)

    out = (
        run(
            "generate",
            "--model",
            str(model),
            "--prompt",
            "你好",
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "5",
            "--json",
        )
        .stdout.strip()
        .splitlines()
    )
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == ["你好", "Hello world"] and all(len(r["ids"]) <= 5 for r in rows)

    chat = run(
        "chat",
        "--model",
        str(model),
        "--seed",
        "1",
        "--max-new-tokens",
        "6",
        stdin="你好\nclear\n再见\nexit\nnot read\n",
    ).stdout
    assert chat.count("ChatGLM: ") == 2 and "(history cleared)" in chat and "not read" not in chat


def test_bad_model_dir_is_a_clear_error(tmp_path):
    result = run("score", "--model", str(tmp_path), "--ids", str(tmp_path / "x.json"), "--out", "o.npz", check=False)
    assert result.returncode != 0
    result = run("generate", "--model", str(tmp_path), "--prompt", "x", check=False)
    assert result.returncode == 2 and "no config.json" in result.stderr
