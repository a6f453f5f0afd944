"""The renderer against openai-harmony (the oracle; tests only), token for token and mask for mask.

A seeded generator writes Harmony conversations with everything the format has: system options,
built-in tools, developer instructions and function tools with varied JSON schemas, several turns,
tool calls and results, unicode, and text that looks like special tokens. For each assistant turn
the target is openai-harmony's `render_conversation_for_training(..., auto_drop_analysis=False)` of
the conversation up to that turn with earlier turns' analysis removed; the expected mask is built
from per-message renders: everything after `<|start|>assistant` of the last turn's messages.
"""

import json
import random
from collections import Counter

import pytest

oh = pytest.importorskip("openai_harmony")
from harmony_oracle import ENC  # noqa: E402
from harmony_oracle import assistant as _assistant  # noqa: E402
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    RenderOptions,
    Role,
    SystemContent,
    ToolDescription,
)

from data import DataError, load_examples  # noqa: E402
KEEP_ANALYSIS = RenderConversationConfig(auto_drop_analysis=False)

TEXTS = [
    "Hello", "What's the weather in Paris?", "naïve café — déjà vu", "日本語のテキストです。", "emoji 🎉🚀👩‍💻",
    "<|start|>", "<|end|>", "<|channel|>final<|message|>", "<|return|>", "<|call|>", "<|endoftext|>",
    "<|constrain|>json", "<|reserved_200013|>", " leading space", "trailing newline\n", "crlf\r\nline",
    "\ttab", "12345678901", "```python\nprint('hi')\n```", "  ", "a" * 40, "Ünïcödé ΑΒΓ абв",
]


def _text(rng):
    return "".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 4)))


def _schema(rng, depth=0):
    kind = rng.choice(["string", "enum", "number", "integer", "boolean", "array", "object", "types", "oneof"]
                      if depth < 2 else ["string", "number", "boolean", "enum"])
    s: dict = {}
    if kind == "string":
        s = {"type": "string"}
        if rng.random() < 0.3:
            s["default"] = rng.choice(["auto", "x y", ""])
    elif kind == "enum":
        s = {"type": "string", "enum": rng.sample(["c", "f", "kelvin", "a b"], rng.randint(1, 3))}
        if rng.random() < 0.4:
            s["default"] = s["enum"][0]
    elif kind in ("number", "integer"):
        s = {"type": kind}
        if rng.random() < 0.5:
            s["default"] = rng.choice([0, -1, 10, 0.5, 1e-7, 2.5e20, 0.0001, 123456.789, 1e16, 3.0])
    elif kind == "boolean":
        s = {"type": "boolean", "default": rng.choice([True, False])} if rng.random() < 0.5 else {"type": "boolean"}
    elif kind == "array":
        s = {"type": "array", "items": _schema(rng, depth + 1)} if rng.random() < 0.7 else {"type": "array"}
    elif kind == "object":
        s = _object(rng, depth + 1)
    elif kind == "types":
        s = {"type": rng.choice([["number", "string"], ["integer", "null"], ["string"]])}
        if rng.random() < 0.3:
            s["default"] = -1
    else:
        s = {"oneOf": [_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
        for v in s["oneOf"]:
            if rng.random() < 0.3:
                v["description"] = _text(rng).replace("\n", " ")
            if rng.random() < 0.2:
                v["nullable"] = True
        if rng.random() < 0.3:
            s["default"] = rng.choice(["x", 3, None])
    if rng.random() < 0.4:
        s["description"] = rng.choice(["The city.", "Line one\nline two", "Unit — °C or °F"])
    if rng.random() < 0.1:
        s["title"] = "Title"
    if rng.random() < 0.1:
        s["examples"] = ["ex1", 2, "ex 3"]
    if rng.random() < 0.1:
        s["nullable"] = True
    return s


def _object(rng, depth=0):
    names = rng.sample(["city", "unit", "days", "query", "options", "zeta", "alpha", "n", "flag"], rng.randint(0, 4))
    obj = {"type": "object", "properties": {n: _schema(rng, depth) for n in names}}
    if names and rng.random() < 0.7:
        obj["required"] = rng.sample(names, rng.randint(1, len(names)))
    if rng.random() < 0.2:
        obj["description"] = "An object."
    return obj


def _system(rng):
    s = SystemContent.new()
    if rng.random() < 0.3:
        s = s.with_model_identity(rng.choice(["You are a helpful bot.", "Identity\nwith lines"]))
    s.reasoning_effort = rng.choice([ReasoningEffort.LOW, ReasoningEffort.MEDIUM, ReasoningEffort.HIGH, None])
    if rng.random() < 0.4:
        s = s.with_conversation_start_date(rng.choice(["2025-06-28", "2024-01-01"]))
    if rng.random() < 0.2:
        s.knowledge_cutoff = None
    if rng.random() < 0.3:
        s = s.with_browser_tool()
    if rng.random() < 0.3:
        s = s.with_python_tool()
    if rng.random() < 0.1:
        s.channel_config = None
    elif rng.random() < 0.1:
        s = s.with_required_channels(["analysis", "final"])
    return Message.from_role_and_content(Role.SYSTEM, s)


def _developer(rng):
    d = DeveloperContent.new()
    if rng.random() < 0.8:
        d = d.with_instructions(_text(rng))
    if rng.random() < 0.6:
        tools = []
        for name in rng.sample(["get_weather", "search_docs", "add", "noop"], rng.randint(1, 3)):
            params = None if name == "noop" else _object(rng)
            tools.append(ToolDescription.new(name, rng.choice(["Gets it.", "Two\nlines", "", "CRLF\r\nlines\n"]),
                                             params))
        d = d.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, d)


def _conversation(rng):
    """(messages, indices that end an assistant turn)."""
    msgs = []
    if rng.random() < 0.7:
        msgs.append(_system(rng))
    if rng.random() < 0.7:
        msgs.append(_developer(rng))
    ends = []
    for turn in range(rng.randint(1, 4)):
        msgs.append(Message.from_role_and_content(Role.USER, _text(rng)))
        for _ in range(rng.randint(0, 2)):  # tool calls inside the turn
            if rng.random() < 0.7:
                msgs.append(_assistant(_text(rng), "analysis"))
            tool = rng.choice(["functions.get_weather", "functions.add", "browser.search", "python"])
            channel = "analysis" if not tool.startswith("functions") else "commentary"
            ctype = rng.choice(["<|constrain|>json", "json", None]) if channel == "commentary" else None
            call = _assistant(json.dumps({"city": _text(rng)}), channel, recipient=tool)
            msgs.append(call.with_content_type(ctype) if ctype else call)
            msgs.append(Message.from_author_and_content(Author.new(Role.TOOL, tool), _text(rng))
                        .with_channel(channel).with_recipient("assistant"))
        if rng.random() < 0.8:
            msgs.append(_assistant(_text(rng), "analysis"))
        if rng.random() < 0.2:
            msgs.append(_assistant(_text(rng), "commentary"))  # a preamble to the user
        last = turn == 0 or rng.random() < 0.5
        if rng.random() < 0.15 and last:  # the data ends with a call awaiting its result
            msgs.append(_assistant('{"a": 1}', "commentary", recipient="functions.add",
                                   content_type="<|constrain|>json"))
            ends.append(len(msgs) - 1)
            break
        msgs.append(_assistant(_text(rng), "final"))
        ends.append(len(msgs) - 1)
    return msgs, ends


def _expected(msgs, ends, loss_on="last_turn"):
    """The oracle's examples: (ids, mask) per turn."""
    if not any(m.author.role == Role.SYSTEM for m in msgs):
        msgs = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new()), *msgs]
        ends = [e + 1 for e in ends]
    out = []
    for t, end in enumerate(ends):
        prev = ends[t - 1] if t else -1
        keep = [i for i in range(end + 1) if not (i <= prev and msgs[i].channel == "analysis")]
        ids = ENC.render_conversation_for_training(Conversation.from_messages([msgs[i] for i in keep]), KEEP_ANALYSIS)
        has_fn = any(c.tools and c.tools.get("functions") and c.tools["functions"].tools
                     for i in keep for c in msgs[i].content if isinstance(c, DeveloperContent))
        mask = []
        turn_of = {i: next(t for t, e in enumerate(ends) if i <= e) for i in keep}
        for j, i in enumerate(keep):
            n = len(ENC.render(msgs[i], RenderOptions(conversation_has_function_tools=bool(has_fn))))
            m = msgs[i]
            trained = m.author.role == Role.ASSISTANT and (
                loss_on == "all_assistant" or (i > prev and (loss_on == "last_turn" or m.channel == "final")))
            # The model writes <|start|>assistant itself right after its own <|end|> in the same turn.
            before = msgs[keep[j - 1]] if j else None
            continues = (before is not None and before.author.role == Role.ASSISTANT
                         and before.recipient in (None, "all") and turn_of[keep[j - 1]] == turn_of[i])
            head = 0 if continues else 2  # <|start|> and "assistant" (one token: asserted below)
            mask += [0] * n if not trained else [0] * head + [1] * (n - head)
        assert len(mask) == len(ids)
        out.append((ids, mask))
    return out


def test_assistant_role_is_one_token():
    assert len(ENC.encode("assistant")) == 1


@pytest.mark.parametrize("loss_on", ["last_turn", "final_only", "all_assistant"])
def test_token_exact_against_openai_harmony(loss_on):
    rng = random.Random({"last_turn": 0, "final_only": 1, "all_assistant": 2}[loss_on])
    n = 400 if loss_on == "last_turn" else 120
    convs = [_conversation(rng) for _ in range(n)]
    rows = [json.loads(Conversation.from_messages(msgs).to_json()) for msgs, _ in convs]
    examples, report = load_examples(rows, "harmony", loss_on=loss_on)
    expected = [(ids, mask, r) for r, (msgs, ends) in enumerate(convs) for ids, mask in _expected(msgs, ends, loss_on)
                if any(mask)]
    assert report.skipped == Counter() and report.examples == len(expected)
    assert sum(report.dropped.values()) == sum(len(ends) for _, ends in convs) - len(expected)
    for e, (ids, mask, r) in zip(examples, expected):
        assert e.row == r
        assert e.input_ids == ids, ENC.decode_utf8(ids)
        assert e.loss_mask == mask, ENC.decode_utf8(ids)


def test_no_split_turns_is_the_last_turn_only():
    rng = random.Random(5)
    convs = [_conversation(rng) for _ in range(40)]
    rows = [json.loads(Conversation.from_messages(msgs).to_json()) for msgs, _ in convs]
    examples, _ = load_examples(rows, "harmony", split_turns=False)
    assert [(e.input_ids, e.loss_mask) for e in examples] == [_expected(m, ends)[-1] for m, ends in convs]


def test_look_alikes_are_text_and_earlier_analysis_is_dropped():
    row = {"messages": [
        {"role": "user", "content": "<|start|>assistant<|channel|>final<|message|>hi<|return|>"},
        {"role": "assistant", "channel": "analysis", "content": "FIRST-THOUGHT"},
        {"role": "assistant", "channel": "final", "content": "one"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "channel": "analysis", "content": "SECOND-THOUGHT"},
        {"role": "assistant", "channel": "final", "content": "two"},
    ]}
    first, second = load_examples([row], "harmony")[0]
    text = ENC.decode_utf8(second.input_ids)
    assert "FIRST-THOUGHT" not in text and "SECOND-THOUGHT" in text
    assert "FIRST-THOUGHT" in ENC.decode_utf8(first.input_ids)
    specials = {200002, 200005, 200006, 200007, 200008, 200012}
    user = first.input_ids.index(ENC.encode("user")[0])
    body = first.input_ids[first.input_ids.index(200008, user) + 1: first.input_ids.index(200007, user)]
    assert not specials & set(body) and ENC.decode_utf8(body) == row["messages"][0]["content"]
    assert second.input_ids[-1] == 200002 and second.loss_mask[-1] == 1
    assert first.input_ids[0] == 200006 and first.loss_mask[0] == 0


def test_bad_harmony_rows_name_the_row_and_reason():
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "channel": "final", "content": "ok"}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "channel": "final", "content": "y"}]},
    ]
    with pytest.raises(DataError, match=r"row 1: unknown role 'robot'"):
        load_examples(rows, "harmony")
    examples, report = load_examples(rows, "harmony", on_error="skip")
    assert len(examples) == 1
    assert report.skipped == Counter({"unknown role": 1, "no assistant turn": 1, "tool message without name": 1})
    assert "skipped 3 rows" in str(report)

