"""The OpenAI API's mapping onto ChatGLM3 (messages, tools, replayed calls) and the streamed reply text (stop
strings, held-back text, tool calls), on the real tokenizer; no server."""

import json

import pytest

from glm3.dialog.tool_call import ToolCallError, format_tool_call, parse_tool_call
from glm3.serve.protocol import (
    TOOLS_SYSTEM_PROMPT,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    conversation,
    parse,
)
from glm3.serve.reply import ChatReply, TextStream

WEATHER = {"name": "get_weather", "description": "the weather", "parameters": {"type": "object"}}


def chat_request(messages, **fields):
    return parse(ChatCompletionRequest, {"messages": messages, **fields})


def test_messages_map_onto_chatglm3_roles_with_tools_in_the_system_message():
    request = chat_request(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "北京"}, {"type": "text", "text": "天气？"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": [1, 2]}'},
                    }
                ],  # fmt: skip
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 20}'},
        ],
        tools=[{"type": "function", "function": WEATHER}],
    )
    history, query, role = conversation(request)
    assert history == [
        {"role": "system", "content": "Be brief.", "tools": [WEATHER]},
        {"role": "user", "content": "北京天气？"},
        {
            "role": "assistant",
            "metadata": "get_weather",
            "content": '```python\ntool_call(city="北京", days=[1, 2])\n```',
        },
    ]
    assert (query, role) == ('{"temperature": 20}', "observation")


def test_tools_without_a_system_message_get_chatglm3_s_tool_prompt_and_tool_choice_none_drops_them():
    messages = [{"role": "user", "content": "hi"}]
    history, _, _ = conversation(chat_request(messages, tools=[{"type": "function", "function": WEATHER}]))
    assert history == [{"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": [WEATHER]}]
    history, query, role = conversation(
        chat_request(messages, tools=[{"type": "function", "function": WEATHER}], tool_choice="none")
    )
    assert history == [] and (query, role) == ("hi", "user")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, "not supported"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "text"),
        ("not an object", "Input should be"),
    ],
)
def test_requests_the_server_cannot_honour_are_refused_with_the_field(body, message):
    with pytest.raises(APIError) as refused:
        parse(ChatCompletionRequest, body)
    assert refused.value.status == 400 and message in refused.value.message


def test_the_last_message_is_the_turn_the_model_answers_and_arguments_must_be_json_objects():
    with pytest.raises(APIError, match="last message"):
        conversation(chat_request([{"role": "system", "content": "x"}]))
    for arguments, error in (("[1]", "JSON object"), ("{bad", "not JSON"), ('{"1x": 1}', "argument name")):
        call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}
        with pytest.raises(APIError, match=error):
            conversation(chat_request([{"role": "user", "content": "q"}, call, {"role": "tool", "content": "r"}]))


def test_sampling_defaults_are_chat_s_and_temperature_zero_is_greedy():
    messages = [{"role": "user", "content": "x"}]
    default = chat_request(messages).sampling()
    assert (default.do_sample, default.temperature, default.top_p) == (True, 0.8, 0.8)
    greedy = chat_request(messages, temperature=0, seed=3).sampling()
    assert not greedy.do_sample and greedy.seed == 3
    assert chat_request(messages, max_completion_tokens=5, max_tokens=9).token_budget() == 5
    assert parse(CompletionRequest, {"prompt": "x"}).token_budget() == 16
    assert parse(CompletionRequest, {"prompt": [[5, 6, 7]]}).prompt_ids(None) == [5, 6, 7]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"city": '北京 "quoted"\n', "n": -3, "x": 1.5e-7, "ok": False, "none": None},
        {"nested": {"a": [1, {"b": [True, "c"]}]}, "empty": [], "big": 2**63},
    ],
)
def test_a_replayed_call_parses_back_to_its_arguments(params):
    assert parse_tool_call(format_tool_call(params)) == params


def test_calls_json_cannot_carry_are_refused():
    for params in ({"x": float("nan")}, {"class": 1}, {"x": {1: 2}}, {"x": 2**64}):
        with pytest.raises(ToolCallError):
            format_tool_call(params)


def stream(reply, tokens):
    deltas = [reply.push(t) for t in tokens]
    return deltas


def test_a_stop_string_cuts_the_text_and_is_never_sent_in_part(tokenizer):
    text = "你好，今天天气很好，我们去公园。"
    tokens = tokenizer.encode(text)
    reply = TextStream(tokenizer, stops=["天气很", "不会出现"])
    deltas = [d for d in stream(reply, tokens) if d]
    # Deltas only ever add text, so nothing after the cut (not even 天气, where the stop begins) was sent.
    assert reply.stopped and "".join(deltas) + reply.finish() == "你好，今天" and len(deltas) > 1


def test_a_chat_reply_streams_its_text_stripped_exactly_as_the_answer(tokenizer):
    tokens = tokenizer.encode("\n  好的，明天见。  ")
    reply = ChatReply(tokenizer, history=[])
    deltas = "".join(stream(reply, tokens))
    last, message = reply.finish()
    assert deltas + last == message["content"] == "好的，明天见。" and "tool_calls" not in message
    assert deltas  # the text streamed before the end


def test_a_tool_call_reply_is_held_back_and_becomes_tool_calls(tokenizer):
    tools = [{"role": "system", "content": "tools", "tools": [WEATHER]}]
    text = 'get_weather\n```python\ntool_call(city="北京")\n```'
    reply = ChatReply(tokenizer, history=tools)
    assert "".join(stream(reply, tokenizer.encode(text))) == ""
    last, message = reply.finish()
    assert last == "" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "北京"}
    malformed = ChatReply(tokenizer, history=tools)
    stream(malformed, tokenizer.encode("get_weather\ntool_call(city=__import__('os'))"))
    _, message = malformed.finish()
    assert "tool_calls" not in message and message["content"].startswith("[invalid tool call] get_weather")
