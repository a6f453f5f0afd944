"""Each row format renders exactly like the equivalent Harmony conversation (built with openai-harmony,
rendered by it for the ids, and through the `harmony` format, which test_data_harmony checks
against the oracle, for the masks)."""

import json

import pytest

pytest.importorskip("openai_harmony")
from harmony_oracle import assert_renders_like, assistant, call, developer, result, system, user  # noqa: E402
from openai_harmony import ReasoningEffort  # noqa: E402

from data import DataError, load_examples  # noqa: E402
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}












def test_messages_thinking_system_developer_and_effort():
    row = {
        "reasoning_effort": "high",
        "developer": "Answer in French.",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi <|end|>"},
            {"role": "assistant", "thinking": "greet", "content": "Bonjour"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "thinking": "no tools", "content": "Je ne sais pas."},
        ],
    }
    conv = [system(ReasoningEffort.HIGH), developer("Answer in French.\n\nBe brief."), user("Hi <|end|>"),
            assistant("greet", "analysis"), assistant("Bonjour", "final"), user("Weather?"),
            assistant("no tools", "analysis"), assistant("Je ne sais pas.", "final")]
    got = assert_renders_like(row, "messages", conv)
    assert len(got) == 2
    assert_renders_like(row, "messages", conv, split_turns=False)


def test_messages_hf_tool_calls_and_tools_column():
    row = {
        "tools": [{"name": "get_weather", "description": "Weather now", "parameters": WEATHER}],
        "messages": [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "thinking": "call it",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "20C"},
            {"role": "assistant", "content": "20C in Paris."},
        ],
    }
    conv = [developer(None, [("get_weather", "Weather now", WEATHER)]), user("Paris?"),
            assistant("call it", "analysis"), call("get_weather", '{"city": "Paris"}'), result("get_weather", "20C"),
            assistant("20C in Paris.", "final")]
    assert_renders_like(row, "messages", conv)


def test_openai_parallel_calls_are_paired_by_id_and_a_pending_call_ends_the_data():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
             {"type": "function", "function": {"name": "get_time", "description": "Time"}}]
    row = {
        "tools": json.dumps(tools),  # as CSV/Parquet columns often hold it
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather and time in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "b", "content": "12:00"},
            {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "25C"}]},
            {"role": "assistant", "content": "25C, noon."},
            {"role": "user", "content": "And Oslo?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        ],
    }
    conv = [developer("You are terse.", [("get_weather", "Weather", WEATHER), ("get_time", "Time", None)]),
            user("Weather and time in Rome?"), call("get_weather", '{"city":"Rome"}'), result("get_weather", "25C"),
            call("get_time", "{}"), result("get_time", "12:00"), assistant("25C, noon.", "final"),
            user("And Oslo?"), assistant("Checking.", "analysis"), call("get_weather", '{"city":"Oslo"}')]
    got = assert_renders_like(row, "openai", conv)
    assert len(got) == 2 and got[1].input_ids[-1] == 200012  # <|call|>


def test_prompt_completion_plain_and_conversational():
    assert_renders_like({"prompt": "2+2?", "completion": "4"}, "prompt_completion", [user("2+2?"), assistant("4", "final")])
    row = {"prompt": [{"role": "system", "content": "Math tutor."}, {"role": "user", "content": "2+2?"}],
           "completion": [{"role": "assistant", "content": "4", "thinking": "add"}], "reasoning_effort": "low"}
    assert_renders_like(row, "prompt_completion", [system(ReasoningEffort.LOW), developer("Math tutor."), user("2+2?"),
                                                   assistant("add", "analysis"), assistant("4", "final")])


def test_sharegpt():
    row = {"conversations": [{"from": "system", "value": "Pirate."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Arr"}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Yo ho"}]}
    conv = [developer("Pirate."), user("Hi"), assistant("Arr", "final"), user("Bye"), assistant("Yo ho", "final")]
    assert len(assert_renders_like(row, "sharegpt", conv)) == 2


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "openai"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "channel": "final", "content": "b"}]},
     "harmony"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
])
def test_auto_detection_says_what_it_chose(row, fmt, capsys):
    examples, report = load_examples([row], "auto")
    assert report.format == fmt and len(examples) == 1
    assert f"format auto -> {fmt}" in capsys.readouterr().err


@pytest.mark.parametrize("row, reason, where", [
    ({"messages": [{"role": "narrator", "content": "x"}]}, "unknown role", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}, "tool result without call",
     "messages[1]"),
    ({"messages": [{"role": "user", "content": 3}]}, "bad content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "reasoning_effort": "max"}, "bad reasoning_effort", "reasoning_effort"),
    ({"messages": "[not json"}, "invalid JSON", "messages"),
    ({"text": "no conversation"}, "missing messages", "'messages'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "bad tool call", "tool_calls[0]"),
])
def test_bad_rows_say_where_and_what(row, reason, where):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError) as info:
        load_examples([good, row], "messages")
    assert str(info.value).startswith("row 1: ") and where in str(info.value) and info.value.reason == reason
    examples, report = load_examples([good, row, good], "messages", on_error="skip")
    assert [e.row for e in examples] == [0, 2] and dict(report.skipped) == {reason: 1}
