"""openai-harmony (the oracle for rendering; a test dependency only): its encoding and message builders
shared by the data tests."""

from openai_harmony import HarmonyEncodingName, Message, Role, load_harmony_encoding

ENC = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def assistant(text, channel, **kw):
    """An assistant message on `channel`; kw sets recipient, content_type, ... (`with_<key>`)."""
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    for k, v in kw.items():
        m = getattr(m, f"with_{k}")(v)
    return m
