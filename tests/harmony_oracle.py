"""openai-harmony (the oracle for rendering; a test dependency only): its encoding and message builders
shared by the data tests."""

from openai_harmony import (Author, DeveloperContent, HarmonyEncodingName, Message, ReasoningEffort, Role,
                            SystemContent, ToolDescription, load_harmony_encoding)

ENC = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


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
