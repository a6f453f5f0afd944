"""Harmony for training: a conversation -> (input_ids, loss_mask), token for token as openai-harmony
renders it (docs/ARCHITECTURE.md §5).

The target is openai-harmony's `render_conversation_for_training(conv,
RenderConversationConfig(auto_drop_analysis=False))` applied to each example after earlier turns'
analysis is dropped. Harmony tokenizes every piece of a message on its own (role, " to=...",
channel, content type, each content part), so piece boundaries are token boundaries; this module
encodes the same pieces with `encode_ordinary`, which also makes look-alikes of special tokens in
text ordinary text. Only the renderer emits special tokens.

A turn is the run of assistant messages (with the tool results between them) that ends in a
`final` message, or in the conversation's last assistant message (e.g. a tool call awaiting its
result). One example per turn: the conversation up to the end of that turn, with the analysis of
earlier turns dropped, as at inference. `render_for_completion` renders a conversation as the model
reads it before it writes (a prompt for sampling, GRPO, or the shared prompt of a DPO pair): the
same tokens, by the same rules, as the training example that continues it with an assistant turn.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from data.errors import DataError
from data.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, get_tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")
LOSS_ON = ("last_turn", "final_only", "all_assistant")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


@dataclass(frozen=True)
class Tool:
    """One function of a tool namespace; `parameters` is a JSON schema (usually an object)."""

    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass(frozen=True)
class ToolNamespace:
    name: str
    description: str | None = None
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class SystemContent:
    """The system message. Defaults are Harmony's, without a current date (reproducible renders)."""

    model_identity: str | None = DEFAULT_IDENTITY
    reasoning_effort: str | None = "medium"
    conversation_start_date: str | None = None
    knowledge_cutoff: str | None = "2024-06"
    valid_channels: tuple[str, ...] = ("analysis", "commentary", "final")
    channel_required: bool = True
    tools: tuple[ToolNamespace, ...] = ()  # built-in tools: BROWSER, PYTHON

    def text(self, has_function_tools: bool) -> str:
        sections = []
        top = [self.model_identity] if self.model_identity is not None else []
        if self.knowledge_cutoff is not None:
            top.append(f"Knowledge cutoff: {self.knowledge_cutoff}")
        if self.conversation_start_date is not None:
            top.append(f"Current date: {self.conversation_start_date}")
        if top:
            sections.append("\n".join(top))
        if self.reasoning_effort is not None:
            sections.append(f"Reasoning: {self.reasoning_effort}")
        if self.tools:
            sections.append(_tools_section(self.tools))
        if self.valid_channels:
            header = f"# Valid channels: {', '.join(self.valid_channels)}."
            if self.channel_required:
                header += " Channel must be included for every message."
            # Harmony adds this line whenever a developer message declares function tools.
            if has_function_tools:
                header += "\nCalls to these tools must go to the commentary channel: 'functions'."
            sections.append(header)
        return "\n\n".join(sections)


@dataclass(frozen=True)
class DeveloperContent:
    """The developer message: instructions and function tools (namespace `functions`)."""

    instructions: str | None = None
    tools: tuple[ToolNamespace, ...] = ()

    @property
    def has_function_tools(self) -> bool:
        return any(ns.name == "functions" and ns.tools for ns in self.tools)

    def text(self) -> str:
        sections = []
        if self.instructions is not None:
            sections += ["# Instructions", self.instructions]
        if self.tools:
            sections.append(_tools_section(self.tools))
        return "\n\n".join(sections)


Part = str | SystemContent | DeveloperContent


@dataclass
class Message:
    """One Harmony message. A tool result has role "tool" and the tool's name (`functions.x`)."""

    role: str
    content: Part | Sequence[Part] = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None

    @property
    def parts(self) -> Sequence[Part]:
        return (self.content,) if isinstance(self.content, (str, SystemContent, DeveloperContent)) else self.content


def function_tools(tools: Sequence[Tool]) -> tuple[ToolNamespace, ...]:
    """Function tools as the developer message declares them."""
    return (ToolNamespace("functions", None, tuple(tools)),) if tools else ()


# --- built-in tools: the exact text gpt-oss was trained with (openai-harmony's chat.rs) ---

BROWSER = ToolNamespace(
    "browser",
    "Tool for browsing.\nThe `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\nsources=web (default: web)",
    (
        Tool("search", "Searches for information related to `query` and displays `topn` results.",
             {"type": "object", "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                                               "source": {"type": "string"}}, "required": ["query"]}),
        Tool("open",
             "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing "
             "`num_lines` lines.\nValid link ids are displayed with the formatting: `【{id}†.*】`.\nIf `cursor` is "
             "not provided, the most recent page is implied.\nIf `id` is a string, it is treated as a fully "
             "qualified URL associated with `source`.\nIf `loc` is not provided, the viewport will be positioned "
             "at the beginning of the document or centered on the most relevant passage, if available.\nUse this "
             "function without `id` to scroll to a new location of an opened page.",
             {"type": "object", "properties": {
                 "id": {"type": ["number", "string"], "default": -1}, "cursor": {"type": "number", "default": -1},
                 "loc": {"type": "number", "default": -1}, "num_lines": {"type": "number", "default": -1},
                 "view_source": {"type": "boolean", "default": False}, "source": {"type": "string"}}}),
        Tool("find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
             {"type": "object", "properties": {"pattern": {"type": "string"},
                                               "cursor": {"type": "number", "default": -1}},
              "required": ["pattern"]}),
    ),
)

PYTHON = ToolNamespace(
    "python",
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to "
    "python, it will be executed in a stateful Jupyter notebook environment. python will respond with the "
    "output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save "
    "and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.",
)


# --- tools sections: JSON schema -> the TypeScript-like declarations gpt-oss was trained on ---

def _lines(s: str) -> list[str]:
    """Rust's `str::lines`: split on \\n, strip a \\r only before a \\n, no empty line after a final \\n."""
    parts = s.split("\n")
    return [p[:-1] if p.endswith("\r") else p for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    out = ["# Tools"]
    for ns in namespaces:
        part = [f"## {ns.name}\n"]
        for line in _lines(ns.description or ""):
            part.append(f"// {line}" if ns.tools else line)
        if ns.tools:
            part.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                part += [f"// {line}" for line in _lines(tool.description)]
                if tool.parameters is None:
                    part.append(f"type {tool.name} = () => any;\n")
                else:
                    part.append(f"type {tool.name} = (_: {_ts(tool.parameters, '')}) => any;\n")
            part.append(f"}} // namespace {ns.name}")
        out.append("\n".join(part))
    return "\n\n".join(out)


def _json(v) -> str:
    """Compact JSON as serde_json prints a value (Harmony prints defaults this way)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_json(x)}" for k, x in v.items()) + "}"
    return "[" + ",".join(_json(x) for x in v) + "]"


def _float(x: float) -> str:
    """A float as Rust's ryu formats it: same shortest digits as Python's repr, other exponent rules."""
    if x != x or x in (float("inf"), float("-inf")):
        return "null"
    text = repr(abs(x))
    mant, _, exp = text.partition("e")
    whole, _, frac = mant.partition(".")
    digits = (whole + frac).lstrip("0")
    sign = "-" if str(x).startswith("-") else ""
    if not digits:
        return sign + "0.0"
    e10 = (int(exp) if exp else 0) - len(frac) + (len(digits) - len(digits.rstrip("0")))
    digits = digits.rstrip("0")
    n, kk = len(digits), len(digits) + e10  # value = digits * 10**e10; kk = place of the decimal point
    if 0 <= e10 and kk <= 16:
        return f"{sign}{digits}{'0' * e10}.0"
    if 0 < kk <= 16:
        return f"{sign}{digits[:kk]}.{digits[kk:]}"
    if -5 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{digits}"
    return f"{sign}{digits[0]}{'.' + digits[1:] if n > 1 else ''}e{kk - 1}"


def _get(schema, key):
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema, key) -> bool:
    return isinstance(schema, dict) and key in schema


def _is_enum(schema) -> bool:
    enum = _get(schema, "enum")
    return isinstance(enum, list) and len(enum) > 0


def _default(schema, raw_enum: bool) -> str:
    """`default: ...`: quoted raw for plain strings; raw (or JSON, at a top-level oneOf) for enum strings."""
    d = schema["default"]
    if isinstance(d, str) and not _is_enum(schema):
        return f'default: "{d}"'
    if isinstance(d, str) and raw_enum:
        return f"default: {d}"
    return f"default: {_json(d)}"


def _nullable(schema, type_str: str) -> str:
    return f"{type_str} | null" if _get(schema, "nullable") is True and "null" not in type_str else type_str


def _ts(schema, indent: str) -> str:
    """A JSON schema as a TypeScript type, following openai-harmony's `json_schema_to_typescript`."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _nullable(variant, _ts(variant, indent + "   "))
            notes = [d] if isinstance(d := _get(variant, "description"), str) else []
            if _has(variant, "default"):
                notes.append(_default(variant, raw_enum=False))
            if notes:
                out += " // " + " ".join(notes)
        return out
    ty = _get(schema, "type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        return _ts_object(schema, indent)
    if ty == "string":
        enum = schema.get("enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        return _ts(schema["items"], indent) + "[]" if "items" in schema else "Array<any>"
    return "any"


def _ts_object(schema: dict, indent: str) -> str:
    out = f"{indent}// {desc}\n" if isinstance(desc := schema.get("description"), str) else ""
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, val in props.items():
            mark = "" if key in required else "?"
            if isinstance(title := _get(val, "title"), str):
                out += f"{indent}// {title}\n{indent}//\n"
            desc = _get(val, "description")
            desc = desc if isinstance(desc, str) else None
            if not _has(val, "oneOf") and desc is not None:
                out += f"{indent}// {desc}\n"
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
            variants = _get(val, "oneOf")
            if isinstance(variants, list):
                out += _ts_one_of_property(key + mark, val, variants, desc, indent)
                continue
            out += f"{indent}{key}{mark}: " + _nullable(val, _ts(val, indent + "    ")) + ","
            if not _has(val, "oneOf") and _has(val, "default"):
                out += " // " + _default(val, raw_enum=True)
            out += "\n"
    return out + f"{indent}}}"


def _ts_one_of_property(name: str, val: dict, variants: list, desc: str | None, indent: str) -> str:
    # The property's description goes above it unless the first variant repeats it.
    above = desc is not None and not (variants and _get(variants[0], "description") == desc)
    out = f"{indent}// {desc}\n" if above else ""
    if "default" in val:
        out += f"{indent}// {_default(val, raw_enum=True)}\n"
    out += f"{indent}{name}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _nullable(variant, _ts(variant, indent + "   "))
        notes = []
        vdesc = _get(variant, "description")
        if not (i == 0 and above) and isinstance(vdesc, str) and vdesc != desc:
            notes.append(vdesc)
        if _has(variant, "default"):
            notes.append(_default(variant, raw_enum=True))
        out += (" // " + " ".join(notes) if notes else "") + "\n"
    return out + f"{indent},\n"


# --- rendering ---

@functools.lru_cache(maxsize=16384)
def _encode_cached(text: str) -> tuple[int, ...]:
    # Headers, system and developer texts repeat across a dataset; message bodies mostly do not.
    return tuple(get_tokenizer().encode_ordinary(text))


def _head(m: Message) -> list[int]:
    """`<|start|>` and the author: what the harness writes before the model generates a message."""
    if m.role not in ROLES:
        raise DataError(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})", "unknown role")
    if m.role == "tool":
        if not m.name:
            raise DataError("a tool message needs the tool's name (e.g. functions.get_weather)", "tool message without name")
        return [START, *_encode_cached(m.name)]
    head = [START, *_encode_cached(m.role)]
    if m.name is not None:
        head += _encode_cached(f":{m.name}")
    return head


def _body(m: Message, has_function_tools: bool) -> list[int]:
    """The rest of the header, `<|message|>` and the content; the terminator is added per example."""
    out: list[int] = []
    if m.recipient is not None and m.recipient != "all":
        out += _encode_cached(f" to={m.recipient}")
    if m.channel is not None:
        out.append(CHANNEL)
        out += _encode_cached(m.channel)
    if m.content_type is not None:
        if m.content_type.startswith("<|constrain|>"):
            out += _encode_cached(" ")
            out.append(CONSTRAIN)
            if rest := m.content_type[len("<|constrain|>"):]:
                out += _encode_cached(rest)
        else:
            out += _encode_cached(f" {m.content_type}")
    out.append(MESSAGE)
    encode = get_tokenizer().encode_ordinary
    for part in m.parts:
        if isinstance(part, str):
            out += encode(part)
        elif isinstance(part, SystemContent):
            if m.role != "system":
                raise DataError(f"system content in a {m.role} message", "misplaced system content")
            out += _encode_cached(part.text(has_function_tools))
        elif isinstance(part, DeveloperContent):
            if m.role != "developer":
                raise DataError(f"developer content in a {m.role} message", "misplaced developer content")
            out += _encode_cached(part.text())
        else:
            raise DataError(f"message content must be text, got {type(part).__name__}", "bad content")
    return out


def turn_ends(messages: Sequence[Message]) -> list[int]:
    """Indices of the messages that end an assistant turn: a `final` message, an assistant message
    the user (or system/developer) answers, and the last assistant message of the conversation."""
    ends = []
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    for i, m in enumerate(messages[: last + 1]):
        if m.role != "assistant":
            continue
        nxt = messages[i + 1].role if i + 1 < len(messages) else None
        if m.channel == "final" or i == last or nxt in ("user", "system", "developer"):
            ends.append(i)
    return ends


def render_examples(
    messages: Sequence[Message],
    *,
    split_turns: bool = True,
    loss_on: str = "last_turn",
    reasoning_effort: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Render a conversation into training examples: `(input_ids, loss_mask)` pairs, one per assistant
    turn (or only the last with `split_turns=False`).

    loss_on: "last_turn" trains every token the model generates in the example's last turn: for each
    of its messages the header (recipient, channel, content type), `<|message|>`, the content and the
    terminator, and `<|start|>assistant` too where the model writes it (after its own `<|end|>` in
    the same turn; not the turn's first, which the harness writes, nor the one after a tool result). "final_only" trains only the last turn's `final`
    messages. "all_assistant" trains every assistant message kept in the example; risky, since
    earlier finals end in `<|end|>`, which teaches the model not to stop.
    A conversation without a system message gets the default one (with `reasoning_effort`).
    """
    if loss_on not in LOSS_ON:
        raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}", "bad option")
    msgs = list(messages)
    if not any(m.role == "system" for m in msgs):
        msgs.insert(0, Message("system", SystemContent(reasoning_effort=reasoning_effort or "medium")))
    heads = [_head(m) for m in msgs]  # validates roles before anything else is said about the row
    ends = turn_ends(msgs)
    if not ends:
        raise DataError("no assistant message to train on", "no assistant turn")
    bodies: dict[tuple[int, bool], list[int]] = {}
    examples = []
    chosen = range(len(ends)) if split_turns else [len(ends) - 1]
    for t in chosen:
        end, prev = ends[t], (ends[t - 1] if t > 0 else -1)
        # Earlier turns' analysis is dropped, as the model never sees it at inference.
        keep = [i for i in range(end + 1) if not (i <= prev and msgs[i].channel == "analysis")]
        has_fn = any(isinstance(p, DeveloperContent) and p.has_function_tools
                     for i in keep if msgs[i].role == "developer" for p in msgs[i].parts)
        ids: list[int] = []
        mask: list[int] = []
        for i in keep:
            m = msgs[i]
            if (i, has_fn) not in bodies:
                bodies[i, has_fn] = _body(m, has_fn)
            body = bodies[i, has_fn]
            if m.role == "assistant" and i == end and m.channel == "final":
                stop = RETURN
            else:
                stop = CALL if m.role == "assistant" and m.recipient is not None else END
            trained = m.role == "assistant" and (
                loss_on == "all_assistant"
                or (i > prev and (loss_on == "last_turn" or m.channel == "final"))
            )
            # After `<|end|>` the model itself writes the next `<|start|>assistant` of its turn (only
            # `<|return|>` and `<|call|>` stop generation), so that head is trained too; a turn's
            # first head, and the head after a tool result, are written by the harness.
            j = keep.index(i)
            before = msgs[keep[j - 1]] if j > 0 else None
            continues = (before is not None and before.role == "assistant" and before.recipient in (None, "all")
                         and bisect.bisect_left(ends, keep[j - 1]) == bisect.bisect_left(ends, i))
            ids += heads[i]
            ids += body
            ids.append(stop)
            mask += [int(trained and continues)] * len(heads[i])
            mask += [int(trained)] * (len(body) + 1)
        examples.append((ids, mask))
    return examples


def render_for_completion(messages: Sequence[Message], *, reasoning_effort: str | None = None) -> list[int]:
    """A conversation as the model reads it before writing its next message: token ids ending with
    `<|start|>assistant` (openai-harmony's `render_conversation_for_completion` with analysis kept,
    after dropping earlier turns' analysis).

    The rules are `render_examples`'s, so these ids are exactly the prefix of the training example
    that continues the conversation with an assistant turn: the analysis of turns that ended (a
    `final` message, or an assistant message answered by a user, system or developer message) is
    dropped; the analysis of a turn in progress (the conversation ends with a tool result, or with an
    assistant message that is not `final`) is kept; every message ends with `<|end|>`, a tool call
    with `<|call|>`. A conversation without a system message gets the default one.
    """
    msgs = list(messages)
    if not any(m.role == "system" for m in msgs):
        msgs.insert(0, Message("system", SystemContent(reasoning_effort=reasoning_effort or "medium")))
    heads = [_head(m) for m in msgs]
    ends = [i for i, m in enumerate(msgs) if m.role == "assistant" and (
        m.channel == "final" or (i + 1 < len(msgs) and msgs[i + 1].role in ("user", "system", "developer")))]
    prev = ends[-1] if ends else -1
    keep = [i for i in range(len(msgs)) if not (i <= prev and msgs[i].channel == "analysis")]
    has_fn = any(isinstance(p, DeveloperContent) and p.has_function_tools
                 for i in keep if msgs[i].role == "developer" for p in msgs[i].parts)
    ids: list[int] = []
    for i in keep:
        m = msgs[i]
        ids += heads[i]
        ids += _body(m, has_fn)
        ids.append(CALL if m.role == "assistant" and m.recipient is not None else END)
    ids.append(START)
    ids += _encode_cached("assistant")
    return ids
