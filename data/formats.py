"""Row formats -> Harmony conversations (lists of `data.harmony.Message`).

harmony            {"messages": [...]} as openai-harmony's `Conversation.to_json()` writes it.
messages, openai   {"messages": [{"role", "content", "thinking"?, "tool_calls"?}, ...], "tools"?: [...]}
                   (one converter: chat-completions rows are HF messages rows with OpenAI tool calls).
prompt_completion  {"prompt": str | messages, "completion": str | messages}
sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}

Every format honours the per-row columns `reasoning_effort` (low/medium/high), `developer`
(instructions) and `tools` (OpenAI function specs, or a JSON string of them). The mapping of plain
rows follows the HF chat-template convention for gpt-oss (docs/ARCHITECTURE.md §5):
- `system`/`developer` rows -> the developer message's `# Instructions` (several are joined by a blank line);
- an assistant row's `thinking` (or `reasoning_content`/`reasoning`) -> an `analysis` message,
  its `content` -> a `final` message;
- a tool call -> `assistant to=functions.NAME<|channel|>commentary <|constrain|>json` with the
  arguments as content (a JSON string kept verbatim; an object is written with `json.dumps`),
  and content next to tool calls -> the analysis before them;
- a `tool` row -> a message authored by `functions.NAME` to the assistant on `commentary`;
  parallel tool calls become call, result, call, result (paired by `tool_call_id`, else in order).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence

from data.errors import DataError
from data.harmony import (
    REASONING_EFFORTS,
    DeveloperContent,
    Message,
    SystemContent,
    Tool,
    ToolNamespace,
    function_tools,
)

FORMATS = ("harmony", "messages", "openai", "prompt_completion", "sharegpt")


def _err(what: str, reason: str) -> DataError:
    return DataError(what, reason)


def _maybe_json(value, what: str):
    """Columns that hold structures may arrive as JSON strings (CSV, Parquet, hub datasets)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise _err(f"{what} is not valid JSON: {e}", "invalid JSON") from None
    return value


def _effort(value) -> str | None:
    if value is None:
        return None
    effort = str(value).lower()
    if effort not in REASONING_EFFORTS:
        raise _err(f"reasoning_effort must be low, medium or high, got {value!r}", "bad reasoning_effort")
    return effort


def _text(content, what: str) -> str:
    """Message content as text: a string, or a list of OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text") or "") for p in content)
    raise _err(f"{what} must be text (or a list of text parts), got {type(content).__name__}", "bad content")


# --- harmony ---

def _namespaces(raw, what: str) -> tuple[ToolNamespace, ...]:
    if not raw:
        return ()
    if not isinstance(raw, Mapping):
        raise _err(f"{what} must map namespace names to namespaces", "bad tools")
    out = []
    for key in sorted(raw):  # Harmony keeps namespaces in a sorted map
        ns = raw[key]
        if not isinstance(ns, Mapping) or not isinstance(ns.get("name"), str):
            raise _err(f"{what}[{key!r}] needs a name", "bad tools")
        tools = tuple(_tool(t, f"{what}[{key!r}].tools") for t in (ns.get("tools") or ()))
        out.append(ToolNamespace(ns["name"], ns.get("description"), tools))
    return tuple(out)


def _harmony_part(raw, what: str):
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, Mapping):
        raise _err(f"{what} must be an object", "bad content")
    kind = raw.get("type")
    if kind == "text":
        return _text(raw.get("text"), what)
    if kind == "system_content":
        channels = raw.get("channel_config") or {}
        return SystemContent(
            model_identity=raw.get("model_identity"),
            reasoning_effort=_effort(raw.get("reasoning_effort")),
            conversation_start_date=raw.get("conversation_start_date"),
            knowledge_cutoff=raw.get("knowledge_cutoff"),
            valid_channels=tuple(channels.get("valid_channels") or ()),
            channel_required=bool(channels.get("channel_required")),
            tools=_namespaces(raw.get("tools"), f"{what}.tools"),
        )
    if kind == "developer_content":
        return DeveloperContent(raw.get("instructions"), _namespaces(raw.get("tools"), f"{what}.tools"))
    raise _err(f"{what}.type must be text, system_content or developer_content, got {kind!r}", "bad content")


def from_harmony(row: Mapping) -> list[Message]:
    msgs = _messages_column(row)
    out = []
    for i, m in enumerate(msgs):
        what = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _err(f"{what} must be an object", "bad message")
        author = m.get("author") if isinstance(m.get("author"), Mapping) else m
        content = m.get("content")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise _err(f"{what}.content must be a string or a list", "bad content")
        out.append(Message(
            role=str(author.get("role")), name=author.get("name"),
            content=tuple(_harmony_part(p, f"{what}.content[{j}]") for j, p in enumerate(parts)),
            channel=m.get("channel"), recipient=m.get("recipient"), content_type=m.get("content_type"),
        ))
    if not any(m.role == "system" for m in out) and (effort := _effort(row.get("reasoning_effort"))):
        out.insert(0, Message("system", SystemContent(reasoning_effort=effort)))
    return out


# --- messages / openai ---

def _tool(raw, what: str) -> Tool:
    raw = _maybe_json(raw, what)
    if isinstance(raw, Mapping) and isinstance(raw.get("function"), Mapping):
        raw = raw["function"]  # OpenAI: {"type": "function", "function": {...}}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise _err(f"{what}: a tool needs a name", "bad tools")
    params = _maybe_json(raw.get("parameters"), f"{what}.parameters")
    return Tool(raw["name"], raw.get("description") or "", params)


def _tools_column(row: Mapping) -> list[Tool]:
    tools = _maybe_json(row.get("tools"), "tools")
    if not tools:
        return []
    if not isinstance(tools, list):
        raise _err("tools must be a list of function specs", "bad tools")
    return [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]


def _messages_column(row: Mapping, key: str = "messages") -> list:
    msgs = _maybe_json(row.get(key), key)
    if not isinstance(msgs, list):
        raise _err(f"the row needs a {key!r} list", "missing messages")
    if not msgs:
        raise _err(f"{key!r} is empty: an empty conversation has nothing to train", "empty conversation")
    return msgs


def _head(row: Mapping, instructions: list[str], tools: list[Tool]) -> list[Message]:
    """System (with the row's reasoning effort, or left to the renderer's default) and developer."""
    head = []
    if (effort := _effort(row.get("reasoning_effort"))) is not None:
        head.append(Message("system", SystemContent(reasoning_effort=effort)))
    if isinstance(row.get("developer"), str):
        instructions = [row["developer"], *instructions]
    if instructions or tools:
        head.append(Message("developer", DeveloperContent("\n\n".join(instructions) if instructions else None,
                                                           function_tools(tools))))
    return head


def _call_name(call, what: str) -> tuple[str, str, str | None]:
    """(name, arguments text, id) of an OpenAI or HF tool call."""
    if not isinstance(call, Mapping):
        raise _err(f"{what} must be an object", "bad tool call")
    fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _err(f"{what} needs a function name", "bad tool call")
    args = fn.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return name, args, call.get("id")


def _assistant(m: Mapping, what: str) -> list[Message]:
    out = []
    thinking = next((m[k] for k in ("thinking", "reasoning_content", "reasoning") if m.get(k)), None)
    content = _text(m.get("content"), f"{what}.content")
    calls = _maybe_json(m.get("tool_calls"), f"{what}.tool_calls") or []
    if calls:
        if thinking and content:
            raise _err(f"{what} has thinking, content and tool calls; Harmony has one analysis before a call",
                       "ambiguous tool call message")
        if thinking or content:
            out.append(Message("assistant", _text(thinking or content, f"{what}.thinking"), channel="analysis"))
        return out
    if thinking:
        out.append(Message("assistant", _text(thinking, f"{what}.thinking"), channel="analysis"))
    out.append(Message("assistant", content, channel="final"))
    return out


def _call_message(name: str, args: str) -> Message:
    return Message("assistant", args, channel="commentary", recipient=f"functions.{name}",
                   content_type="<|constrain|>json")


def _result_message(name: str, content, what: str) -> Message:
    if not isinstance(content, str) and content is not None and not isinstance(content, list):
        content = json.dumps(content, ensure_ascii=False)
    return Message("tool", _text(content, what), name=f"functions.{name}", channel="commentary",
                   recipient="assistant")


def from_messages(row: Mapping, key: str = "messages", extra_instructions: Sequence[str] = ()) -> list[Message]:
    msgs = _messages_column(row, key)
    instructions = list(extra_instructions)
    body: list[Message] = []
    i = 0
    while i < len(msgs):
        m, what = msgs[i], f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise _err(f"{what} must be an object", "bad message")
        role = m.get("role")
        i += 1
        if role in ("system", "developer"):
            instructions.append(_text(m.get("content"), f"{what}.content"))
        elif role == "user":
            body.append(Message("user", _text(m.get("content"), f"{what}.content")))
        elif role == "assistant":
            body += _assistant(m, what)
            calls = _maybe_json(m.get("tool_calls"), f"{what}.tool_calls") or []
            if not isinstance(calls, list):
                raise _err(f"{what}.tool_calls must be a list", "bad tool call")
            calls = [_call_name(c, f"{what}.tool_calls[{j}]") for j, c in enumerate(calls)]
            results = []
            while i < len(msgs) and isinstance(msgs[i], Mapping) and msgs[i].get("role") == "tool":
                results.append((i, msgs[i]))
                i += 1
            body += _pair_calls(calls, results, key)
        elif role == "tool":
            raise _err(f"{what} is a tool result with no tool call before it", "tool result without call")
        else:
            raise _err(f"{what}.role must be system, developer, user, assistant or tool, got {role!r}", "unknown role")
    return _head(row, instructions, _tools_column(row)) + body


def _pair_calls(calls: list[tuple[str, str, str | None]], results: list[tuple[int, Mapping]], key: str) -> list[Message]:
    """Harmony has no parallel calls: each call is followed by its own result."""
    if len(results) > len(calls):
        j = results[len(calls)][0]
        raise _err(f"{key}[{j}] is a tool result with no tool call before it", "tool result without call")
    by_id = {r.get("tool_call_id"): (j, r) for j, r in results if r.get("tool_call_id") is not None}
    pending = [r for r in results if r[1].get("tool_call_id") is None]
    out = []
    for name, args, call_id in calls:
        out.append(_call_message(name, args))
        result = by_id.pop(call_id, None) if call_id is not None else None
        if result is None and pending:
            result = pending.pop(0)
        if result is not None:
            j, r = result
            out.append(_result_message(r.get("name") or name, r.get("content"), f"{key}[{j}].content"))
    if by_id:
        j = min(by_id.values(), key=lambda r: r[0])[0]
        raise _err(f"{key}[{j}].tool_call_id matches no tool call", "tool result without call")
    return out


def from_prompt_completion(row: Mapping) -> list[Message]:
    prompt, completion = _maybe_json(row.get("prompt"), "prompt"), _maybe_json(row.get("completion"), "completion")
    if prompt is None or completion is None:
        raise _err("the row needs 'prompt' and 'completion'", "missing prompt or completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion (TRL)
        as_list = lambda x, role: x if isinstance(x, list) else [{"role": role, "content": x}]  # noqa: E731
        return from_messages({**row, "messages": as_list(prompt, "user") + as_list(completion, "assistant")})
    completion_msg = {"role": "assistant", "content": completion}
    if row.get("thinking"):
        completion_msg["thinking"] = row["thinking"]
    return from_messages({**row, "messages": [{"role": "user", "content": _text(prompt, "prompt")}, completion_msg]})


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}


def from_sharegpt(row: Mapping) -> list[Message]:
    key = "conversations" if "conversations" in row else "messages"
    turns = _messages_column(row, key)
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or t.get("from") not in _SHAREGPT_ROLES:
            got = t.get("from") if isinstance(t, Mapping) else t
            raise _err(f"{key}[{i}].from must be one of {', '.join(_SHAREGPT_ROLES)}, got {got!r}", "unknown role")
        msgs.append({"role": _SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return from_messages({**row, "messages": msgs})


CONVERTERS: dict[str, Callable[[Mapping], list[Message]]] = {
    "harmony": from_harmony,
    "messages": from_messages,
    "openai": from_messages,
    "prompt_completion": from_prompt_completion,
    "sharegpt": from_sharegpt,
}


def to_conversation(row: Mapping, format: str) -> list[Message]:
    """One row -> Harmony messages. Raises `DataError` saying what is wrong."""
    if format not in CONVERTERS:
        raise DataError(f"unknown format {format!r} (expected auto or one of {', '.join(FORMATS)})", "bad option")
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    return CONVERTERS[format](row)


def detect_format(row: Mapping) -> tuple[str, str]:
    """(format, why) from one row's shape."""
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    if "prompt" in row and "completion" in row:
        return "prompt_completion", "'prompt' and 'completion' columns"
    for key in ("conversations", "messages"):
        msgs = _maybe_json(row.get(key), key)
        if not isinstance(msgs, list) or not msgs:
            continue
        first = [m for m in msgs if isinstance(m, Mapping)]
        if any("from" in m and "value" in m for m in first):
            return "sharegpt", f"a {key!r} list of from/value turns"
        harmony_keys = ("channel", "recipient", "content_type", "author")
        if any(any(m.get(k) is not None for k in harmony_keys) or isinstance(m.get("content"), list)
               and any(isinstance(p, Mapping) and p.get("type") in ("system_content", "developer_content")
                       for p in m["content"]) for m in first):
            return "harmony", f"a {key!r} list with Harmony channels/recipients or system/developer content"
        if row.get("tools") or any(m.get("tool_calls") for m in first):
            return "openai", f"a {key!r} list with tool calls or a 'tools' column"
        return "messages", f"a {key!r} list of role/content messages"
    raise _err(f"cannot tell the format from the columns {sorted(row)}; pass --format", "unknown format")


def announce(format: str, why: str, where: str) -> None:
    print(f"data: format auto -> {format} ({why} in {where})", file=sys.stderr)
