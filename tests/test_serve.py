"""`glm3 serve` as a real server on a free loopback port, driven by real clients: the official openai client and
httpx (raw requests, for what the openai client would not send)."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import glm3
from conftest import PENALTY, PENALTY_TOKENS, Server, follows_the_penalty_rule, subprocess_env, write_scripted_model
from glm3.deploy.export import export_model

pytestmark = pytest.mark.integration
KEY = "test-key-123"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "天气",
            "description": "the weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "integer"}}},
        },
    }
]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("serve"), key=KEY)
    yield s
    assert s.stop() == 0  # SIGTERM: a clean shutdown


@pytest.fixture(scope="module")
def tool_server(tiny_dir, tokenizer, tmp_path_factory):
    """A model scripted to answer every turn with the call 天气(city=3), then <|observation|>."""
    sp = tokenizer.sp
    reply = ["天气", "<0x0A>", "▁tool", "_", "call", "(", "city", "=", "3", ")"]
    script = [
        tokenizer.get_command("<|assistant|>"),
        *map(sp.piece_to_id, reply),
        tokenizer.get_command("<|observation|>"),
    ]
    work = tmp_path_factory.mktemp("tools")
    s = Server(write_scripted_model(tiny_dir, script, work / "model"), work)
    yield s
    s.stop()


def chat(server, content, **options):
    options = {"max_tokens": 24, "temperature": 0, **options}
    return server.client.chat.completions.create(
        model="chatglm3-6b", messages=[{"role": "user", "content": content}], **options
    )


QUESTIONS = [f"第{i}个问题：今天{'天气' * (i % 4 + 1)}怎么样？" for i in range(16)]


def test_models_chat_and_a_stream_that_adds_up_to_the_same_answer(server, tokenizer):
    assert [m.id for m in server.client.models.list().data] == ["chatglm3-6b"]
    answer = chat(server, "你好")
    prompt = tokenizer.build_chat_input("你好")["input_ids"][0]
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 24
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.role == "assistant"
    content = answer.choices[0].message.content
    assert isinstance(content, str) and content
    chunks = list(chat(server, "你好", stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []


def test_completions_are_the_library_s_greedy_generation(server, tiny_model, tokenizer):
    text = "今天天气很好"
    served = server.client.completions.create(model="chatglm3-6b", prompt=text, max_tokens=20, temperature=0)
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), *tokenizer.encode(text)]
    out = glm3.generate(tiny_model, [ids], max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    assert served.choices[0].text == tokenizer.decode(out) and served.usage.completion_tokens == 20
    # Token ids in, token ids out (return_token_ids, as vLLM has it), streamed one chunk per token.
    by_ids = server.post(
        "/v1/completions", {"prompt": ids, "max_tokens": 20, "temperature": 0, "return_token_ids": True}
    )
    assert by_ids.json()["choices"][0]["token_ids"] == out
    stream = server.client.completions.create(
        model="chatglm3-6b",
        prompt=ids,
        max_tokens=20,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert [t for c in chunks for t in (c.model_extra or {}).get("token_ids", [])] == out
    assert "".join(c.text for c in chunks) == served.choices[0].text and chunks[-1].finish_reason == "length"


def test_the_server_penalises_the_prompt_and_the_generated_tokens(server, tiny_model, tokenizer):
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), *tokenizer.encode("天气天气好")]
    body = {"prompt": ids, "max_tokens": PENALTY_TOKENS, "temperature": 0, "repetition_penalty": PENALTY}
    reply = server.post("/v1/completions", {**body, "ignore_eos": True, "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    follows_the_penalty_rule(tiny_model, ids, reply.json()["choices"][0]["token_ids"])


def test_sixteen_concurrent_requests_each_get_what_they_get_alone(server):
    for options in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}):
        alone = [chat(server, q, **options) for q in QUESTIONS]
        before = server.stats()["tokens_generated"]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda q, o=options: chat(server, q, **o), QUESTIONS))
        assert [a.choices[0].message.content for a in together] == [a.choices[0].message.content for a in alone]
        assert [a.usage.completion_tokens for a in together] == [a.usage.completion_tokens for a in alone]
        assert len({a.choices[0].message.content for a in alone}) == 16
        assert server.stats()["tokens_generated"] - before == sum(a.usage.completion_tokens for a in alone)
    stats = server.wait_idle()
    assert stats["peak_decode_batch"] >= 8 and stats["free_blocks"] == stats["usable_blocks"]


def test_a_client_that_disconnects_mid_stream_gives_its_blocks_back(server):
    before = server.stats()["tokens_generated"]
    # A completion streams every token as it comes (a chat reply of this random model may be held back whole).
    stream = server.client.completions.create(
        model="chatglm3-6b", prompt="写一篇很长的文章", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    assert server.stats()["running"] == 1
    stream.close()
    stats = server.wait_idle()
    assert stats["free_blocks"] == stats["usable_blocks"]
    assert stats["tokens_generated"] - before < 900  # cancelled, not run to the end


def test_bad_requests_get_openai_errors_with_the_right_status(server):
    messages = [{"role": "user", "content": "你好"}]

    def error(response, status):
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert body["message"] and body["type"]
        return body

    assert "not JSON" in error(server.post("/v1/chat/completions", content=b"{not json"), 400)["message"]
    assert "messages" in error(server.post("/v1/chat/completions", {"model": "chatglm3-6b"}), 400)["message"]
    body = error(server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert "role" in body["message"]
    last = error(
        server.post("/v1/chat/completions", {"messages": [*messages, {"role": "assistant", "content": "x"}]}), 400
    )
    assert "last message" in last["message"]
    long_prompt = [{"role": "user", "content": "天气" * 3000}]
    assert "at most 1023" in error(server.post("/v1/chat/completions", {"messages": long_prompt}), 400)["message"]
    too_many = error(server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5000}), 400)
    assert "context is 1024 tokens" in too_many["message"]
    assert "n must be 1" in error(server.post("/v1/chat/completions", {"messages": messages, "n": 2}), 400)["message"]
    assert error(server.post("/v1/chat/completions", {"messages": messages, "temperature": 5}), 400)["param"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    error(server.post("/v1/chat/completions", {"messages": image}), 400)
    bad_call = [
        *messages,
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "content": "1"},
    ]
    assert "not JSON" in error(server.post("/v1/chat/completions", {"messages": bad_call}), 400)["message"]
    nested = "[" * 100000 + "]" * 100000
    error(server.post("/v1/chat/completions", content=nested.encode()), 400)
    assert error(server.post("/v1/chat/completions", {"messages": messages, "model": "gpt-4"}), 404)["code"] == (
        "model_not_found"
    )
    error(server.post("/v1/nothing-here", {}), 404)
    error(server.post("/v1/chat/completions", content=b"x" * (5 << 20)), 413)
    assert error(httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}), 401)["code"] == (
        "invalid_api_key"
    )
    wrong = httpx.post(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert error(wrong, 401)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.wait_idle()["free_blocks"] == server.stats()["usable_blocks"]
    assert "Traceback" not in server.output()


def test_a_tool_call_round_trip_with_the_openai_client(tool_server, tokenizer):
    client = tool_server.client
    messages = [{"role": "user", "content": "北京天气怎么样"}]
    first = client.chat.completions.create(model="chatglm3-6b", messages=messages, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (
        call.type == "function" and call.function.name == "天气" and json.loads(call.function.arguments) == {"city": 3}
    )
    # The call goes back as the assistant's turn, the tool's result as an observation: the model answers it.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 20}'},
    ]
    second = client.chat.completions.create(model="chatglm3-6b", messages=messages, tools=TOOLS, temperature=0)
    history = [
        {
            "role": "system",
            "content": "Answer the following questions as best as you can. You have access to the following tools:",
            "tools": [TOOLS[0]["function"]],
        },
        {"role": "user", "content": "北京天气怎么样"},
        {"role": "assistant", "metadata": "天气", "content": "```python\ntool_call(city=3)\n```"},
    ]
    expected = tokenizer.build_chat_input('{"temperature": 20}', history, role="observation")["input_ids"][0]
    assert second.usage.prompt_tokens == len(expected)
    assert second.choices[0].message.tool_calls[0].function.name == "天气"  # the scripted model calls again
    chunks = list(
        client.chat.completions.create(
            model="chatglm3-6b", messages=messages[:1], tools=TOOLS, temperature=0, stream=True
        )
    )
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and json.loads(calls[0][0].function.arguments) == {"city": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Without tools the same reply is text: its first line names no tool.
    plain = client.chat.completions.create(model="chatglm3-6b", messages=messages[:1], temperature=0)
    assert plain.choices[0].message.content.strip() == "tool_call(city=3)"


def test_out_of_blocks_requests_wait_and_all_finish_as_they_would_alone(tiny_dir, tmp_path):
    tight = Server(tiny_dir, tmp_path, "--num-blocks", "8")  # 7 usable blocks of 16 tokens
    try:
        alone = [chat(tight, q, max_tokens=40).choices[0].message.content for q in QUESTIONS[:10]]
        with ThreadPoolExecutor(10) as pool:
            together = list(
                pool.map(lambda q: chat(tight, q, max_tokens=40).choices[0].message.content, QUESTIONS[:10])
            )
        assert together == alone
        stats = tight.wait_idle()
        assert stats["preemptions"] > 0 and stats["free_blocks"] == 7
    finally:
        tight.stop()


def test_a_full_queue_answers_429_and_the_queue_drains(tiny_dir, tmp_path):
    busy = Server(tiny_dir, tmp_path, "--max-num-seqs", "1", "--max-queue", "1")
    try:
        stream = chat(busy, "写一篇很长的文章", stream=True, max_tokens=900, extra_body={"ignore_eos": True})
        next(iter(stream))
        waiting = threading.Thread(target=lambda: chat(busy, "你好", max_tokens=4))
        waiting.start()
        deadline = time.monotonic() + 60
        while busy.stats()["waiting"] != 1:
            assert time.monotonic() < deadline, f"the second request never queued: {busy.stats()}"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(busy, "你好", max_tokens=4)
        assert refused.value.status_code == 429 and "busy" in str(refused.value)
        stream.close()
        waiting.join(60)
        assert not waiting.is_alive() and busy.wait_idle()["free_blocks"] == busy.stats()["usable_blocks"]
    finally:
        busy.stop()


def test_the_paged_export_serves_sixteen_clients_as_it_serves_one(tiny_dir, tmp_path):
    export_model(
        tiny_dir,
        tmp_path / "export",
        batch_size=None,
        prompt_length=64,
        seq_length=256,
        paged=True,
        block_size=8,
        num_blocks=100,
    )
    served = Server(tmp_path / "export", tmp_path, "--max-num-seqs", "16")
    try:
        stats = served.stats()
        assert stats["block_size"] == 8 and stats["usable_blocks"] == 99  # the export's own cache
        alone = [chat(served, q).choices[0].message.content for q in QUESTIONS]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda q: chat(served, q).choices[0].message.content, QUESTIONS))
        assert together == alone and len(set(alone)) == 16
        body = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "天气" * 100}]})
        assert body.status_code == 400 and "at most 64" in body.json()["error"]["message"]
    finally:
        served.stop()


def test_serve_refuses_what_it_cannot_serve_in_one_line(tiny_dir, tmp_path):
    def serve(*args):
        result = subprocess.run(
            [sys.executable, "-m", "glm3.cli", "serve", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=subprocess_env(),
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr.strip().splitlines()[-1]

    assert "is not a directory" in serve("--model", str(tmp_path / "missing"))
    export_model(tiny_dir, tmp_path / "static", batch_size=1, prompt_length=32, seq_length=128)
    assert "needs a paged one" in serve("--model", str(tmp_path / "static"), "--port", "0")
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in serve("--model", str(tiny_dir), "--port", str(port))
    assert "max_num_seqs must be >= 1" in serve("--model", str(tiny_dir), "--max-num-seqs", "0")
