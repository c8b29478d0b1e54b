"""Chat protocol, reply parsing, and tool calls parsed without executing anything."""

import json
import os

import pytest

import glm3
from conftest import write_scripted_model
from glm3.dialog.conversation import process_response
from glm3.dialog.tool_call import ToolCallError, parse_tool_call

TOOLS = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
SYSTEM = {"role": "system", "content": "You can use tools.", "tools": TOOLS}


def test_plain_call_with_literals():
    body = '```python\ntool_call(city="杭州", days=3, opts={"unit": "C", "hourly": [1, 2]}, ok=True, x=None)\n```'
    assert parse_tool_call(body) == {
        "city": "杭州",
        "days": 3,
        "opts": {"unit": "C", "hourly": [1, 2]},
        "ok": True,
        "x": None,
    }


@pytest.mark.parametrize(
    "body",
    [
        'tool_call(__import__("os").system("touch pwned"))',
        'tool_call(x=__import__("os").system("touch pwned"))',
        'tool_call(x=open("pwned", "w"))',
        '__import__("os").system("touch pwned")',
        'tool_call(**{"x": 1})',
        "tool_call(x=(lambda: 1)())",
        "tool_call(x=[i for i in range(10**9)])",
        "other_call(x=1)",
        "tool_call(x=1); import os",
        "tool_call(x=1",
    ],
)
def test_hostile_or_malformed_calls_are_rejected_and_nothing_runs(body, tmp_path):
    with pytest.raises(ToolCallError):
        parse_tool_call(f"```python\n{body}\n```")
    assert not os.path.exists("pwned")


LONG_SUM = "tool_call(a=" + "+".join(["1"] * 5000) + ")"  # RecursionError in Python's parser
HUGE_SUM = "tool_call(a=" + "+".join(["1"] * 40000) + ")"  # MemoryError in Python's parser
MINUSES = "tool_call(a=" + "-" * 5000 + "1)"


@pytest.mark.parametrize(
    "body",
    [
        LONG_SUM,
        HUGE_SUM,
        MINUSES,
        "tool_call(a={1, 2})",
        "tool_call(a=b'x')",
        "tool_call(a=1j)",
        "tool_call(a=1, a=2)",
        'tool_call(a={"k": 1, "k": 2})',
        "tool_call(a=" + "[" * 200 + "]" * 200 + ")",
        "tool_call(a=1e999)",
        "tool_call(a={1: 2})",
        "tool_call(a=0x" + "f" * 3000 + ")",
        "tool_call(a=" + "1" * 5000 + ")",
        "tool_call(a=" + "x" * 200_000 + ")",
    ],
    ids=lambda b: b[:24],
)
def test_a_hostile_reply_is_marked_text_that_prints_as_json(body):
    """What the model writes never raises: a call that is not plain JSON-compatible literals comes back as
    marked text, and whatever comes back prints as JSON (what `glm3 chat` does with a tool call)."""
    content, history = process_response(f"get_weather\n```python\n{body}\n```", [SYSTEM])
    assert isinstance(content, str) and content.startswith(glm3.INVALID_TOOL_CALL_MARKER), content[:200]
    json.dumps(content, ensure_ascii=False)
    json.dumps(history, ensure_ascii=False)


def test_accepted_calls_hold_only_json_values():
    call = 'get_weather\n```python\ntool_call(days=(1, -2), t=-0.5, deep=[[{"k": [None, True]}]])\n```'
    content, _ = process_response(call, [SYSTEM])
    assert content == {
        "name": "get_weather",
        "parameters": {"days": [1, -2], "t": -0.5, "deep": [[{"k": [None, True]}]]},
    }
    assert json.loads(json.dumps(content)) == content  # tuples became lists; nothing JSON cannot hold


def test_process_response_variants():
    content, history = process_response("\n 你好，我是助手。", [{"role": "user", "content": "hi"}])
    assert content == "你好，我是助手。"
    assert history[-1] == {"role": "assistant", "metadata": "", "content": "你好，我是助手。"}
    call = 'get_weather\n```python\ntool_call(city="北京")\n```'
    content, history = process_response(call, [SYSTEM])
    assert content == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert history[-1]["metadata"] == "get_weather"
    bad = 'get_weather\n```python\ntool_call(city=__import__("os").getcwd())\n```'
    content, _ = process_response(bad, [SYSTEM])
    assert isinstance(content, str) and content.startswith(glm3.INVALID_TOOL_CALL_MARKER)
    content, _ = process_response("interpreter\nprint(1)", [{"role": "user", "content": "x"}])
    assert content == {"name": "interpreter", "content": "print(1)"}
    # two assistant segments in one reply: the last one is the response, both go to history
    content, history = process_response("\nfirst<|assistant|>\nsecond", [])
    assert content == "second" and [h["content"] for h in history] == ["first", "second"]


def test_chat_turn_with_tiny_model(tiny_model, tokenizer):
    response, history = glm3.chat(tiny_model, tokenizer, "你好", history=[SYSTEM], max_new_tokens=12, seed=3)
    again, _ = glm3.chat(tiny_model, tokenizer, "你好", history=[SYSTEM], max_new_tokens=12, seed=3)
    assert response == again
    assert history[0] == SYSTEM and history[1] == {"role": "user", "content": "你好"}
    assert history[2]["role"] == "assistant" and len(history) >= 3
    # the reply is what greedy/sampled generation produced, decoded and parsed
    ids = tokenizer.build_chat_input("你好", [SYSTEM])["input_ids"]
    out = glm3.generate(
        tiny_model,
        ids,
        max_new_tokens=12,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        seed=3,
        eos_token_id=list(tokenizer.stop_token_ids),
    )
    new = out[0, len(ids[0]) :].tolist()
    if new[-1] in tokenizer.stop_token_ids:
        new = new[:-1]
    expected, _ = process_response(tokenizer.decode(new), history[:2])
    assert response == expected
    # an observation turn continues the same history
    _, history2 = glm3.chat(
        tiny_model, tokenizer, '{"weather": "晴"}', history, role="observation", max_new_tokens=4, do_sample=False
    )
    assert history2[len(history)] == {"role": "observation", "content": '{"weather": "晴"}'}


@pytest.fixture(scope="module")
def scripted_model(tiny_dir, tokenizer, tmp_path_factory):
    """The tiny ChatGLM3 scripted (conftest.write_scripted_model) to reply "\n好" then 龘, which the tokenizer has
    as three byte-fallback pieces (a character that arrives in parts), then eos."""
    script = [
        tokenizer.get_command("<|assistant|>"),
        tokenizer.sp.piece_to_id("<0x0A>"),
        tokenizer.sp.piece_to_id("好"),
        *[tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in "龘".encode()],
        tokenizer.eos_id,
    ]
    directory = write_scripted_model(tiny_dir, script, tmp_path_factory.mktemp("scripted"))
    return glm3.load_model(directory), len(script) - 2  # the model, and the tokens of its reply


def test_stream_chat_yields_each_complete_character_once_and_never_a_split_one(scripted_model, tokenizer):
    model, reply_tokens = scripted_model
    chunks = list(glm3.stream_chat(model, tokenizer, "写两个字", max_new_tokens=20, do_sample=False))
    final, history = chunks[-1]
    texts = [text for text, _ in chunks[:-1]]
    # One chunk per completed character; the three byte pieces of 龘 arrive as one chunk, after the last.
    assert texts == ["\n", "\n好", "\n好龘"]
    assert len(texts) < reply_tokens and not any("\ufffd" in t for t in texts)
    assert final == "好龘" and history[-1] == {"role": "assistant", "metadata": "", "content": "好龘"}
    reply, _ = glm3.chat(model, tokenizer, "写两个字", max_new_tokens=20, do_sample=False)
    assert reply == final
