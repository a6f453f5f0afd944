"""openai-harmony (the oracle for rendering; a test dependency only): its encoding, message builders
and the comparisons of our renders with its own, shared by the data tests."""

import json

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncodingName, Message, ReasoningEffort,
                            RenderConversationConfig, RenderOptions, Role, SystemContent, ToolDescription,
                            load_harmony_encoding)

from data import PreferencePair, load_examples

ENC = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
KEEP_ANALYSIS = RenderConversationConfig(auto_drop_analysis=False)


def assistant(text, channel, **kw):
    """An assistant message on `channel`; kw sets recipient, content_type, ... (`with_<key>`)."""
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    for k, v in kw.items():
        m = getattr(m, f"with_{k}")(v)
    return m


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def system(effort=ReasoningEffort.MEDIUM):
    return Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))


def developer(instructions=None, tools=()):
    """Developer instructions and function tools given as (name, description, parameters)."""
    d = DeveloperContent.new()
    if instructions is not None:
        d = d.with_instructions(instructions)
    if tools:
        d = d.with_function_tools([ToolDescription.new(n, desc, p) for n, desc, p in tools])
    return Message.from_role_and_content(Role.DEVELOPER, d)


def call(name, args):
    """A commentary-channel call of functions.NAME with JSON arguments."""
    return assistant(args, "commentary", recipient=f"functions.{name}", content_type="<|constrain|>json")


def result(name, text):
    """The tool's answer to such a call."""
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
            .with_channel("commentary").with_recipient("assistant"))


def assert_renders_like(row, fmt, messages, **kw):
    got, report = load_examples([row], fmt, **kw)
    want, _ = load_examples([json.loads(Conversation.from_messages(messages).to_json())], "harmony", **kw)
    assert report.format == fmt and not report.skipped
    assert [(e.input_ids, e.loss_mask) for e in got] == [(e.input_ids, e.loss_mask) for e in want]
    # and the last example is the oracle's own render (analysis before the last user message dropped)
    messages = messages if messages[0].author.role == Role.SYSTEM else [system(), *messages]
    last_user = max(i for i, m in enumerate(messages) if m.author.role == Role.USER)
    kept = [m for i, m in enumerate(messages) if not (i < last_user and m.channel == "analysis")]
    oracle = ENC.render_conversation_for_training(Conversation.from_messages(kept), KEEP_ANALYSIS)
    assert got[-1].input_ids == oracle
    return got


def _with_system(prompt):
    return prompt if prompt[0].author.role == Role.SYSTEM else [system(), *prompt]


def _drop_earlier_analysis(msgs):
    """Analysis of turns that ended (a final, or an assistant message a user answers) is removed."""
    ends = [i for i, m in enumerate(msgs) if m.author.role == Role.ASSISTANT and (
        m.channel == "final" or (i + 1 < len(msgs) and msgs[i + 1].author.role in (Role.USER, Role.SYSTEM,
                                                                                      Role.DEVELOPER)))]
    prev = ends[-1] if ends else -1
    return [m for i, m in enumerate(msgs) if not (i <= prev and m.channel == "analysis")]


def oracle_prompt(prompt):
    kept = _drop_earlier_analysis(_with_system(prompt))
    return ENC.render_conversation_for_completion(Conversation.from_messages(kept), Role.ASSISTANT, KEEP_ANALYSIS)


def oracle_side(prompt, completion, loss_on="last_turn"):
    """(ids, mask) of prompt + completion: the oracle's training render, trained = completion's generated tokens."""
    prompt = _drop_earlier_analysis(_with_system(prompt))
    ids = ENC.render_conversation_for_training(Conversation.from_messages(prompt + completion), KEEP_ANALYSIS)
    has_fn = any(isinstance(c, DeveloperContent) and c.tools and c.tools.get("functions")
                 for m in prompt for c in m.content)
    mask = []
    for m in prompt:
        mask += [0] * len(ENC.render(m, RenderOptions(conversation_has_function_tools=bool(has_fn))))
    for j, m in enumerate(completion):
        n = len(ENC.render(m, RenderOptions(conversation_has_function_tools=bool(has_fn))))
        if m.author.role != Role.ASSISTANT or (loss_on == "final_only" and m.channel != "final"):
            mask += [0] * n
            continue
        before = completion[j - 1] if j else None
        continues = before is not None and before.author.role == Role.ASSISTANT and before.recipient is None
        head = 0 if continues else 2  # <|start|>assistant: the harness's, unless the model wrote it after <|end|>
        mask += [0] * head + [1] * (n - head)
    assert len(mask) == len(ids)
    return ids, mask


def assert_pair(pair, prompt, chosen, rejected, loss_on="last_turn"):
    assert isinstance(pair, PreferencePair)
    for example, completion in ((pair.chosen, chosen), (pair.rejected, rejected)):
        ids, mask = oracle_side(prompt, completion, loss_on)
        assert example.input_ids == ids, ENC.decode_utf8(example.input_ids)
        assert example.loss_mask == mask, ENC.decode_utf8(example.input_ids)
        assert example.row == pair.row
    # both sides start with the prompt the model reads before it answers, and nothing of it trains
    p = oracle_prompt(prompt)
    assert p[-2:] == [200006, ENC.encode("assistant")[0]]
    for e in (pair.chosen, pair.rejected):
        assert e.input_ids[:len(p)] == p and not any(e.loss_mask[:len(p)])
    if loss_on == "last_turn":
        assert pair.chosen.loss_mask.index(1) == pair.rejected.loss_mask.index(1) == len(p)
