"""Row formats -> Harmony conversations (lists of `data.harmony.Message`).

harmony            {"messages": [...]} as openai-harmony's `Conversation.to_json()` writes it.
messages, openai   {"messages": [{"role", "content", "thinking"?, "tool_calls"?}, ...], "tools"?: [...]}
                   (one converter: chat-completions rows are HF messages rows with OpenAI tool calls).
prompt_completion  {"prompt": str | messages, "completion": str | messages}
sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
preference         {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                   (DPO), or chosen/rejected as whole conversations sharing their prompt
prompts            {"prompt": str | messages, ...columns for reward functions} (GRPO)
NAME               a public dataset's own schema, mapped to one of the above by `data.mappings`
                   (multilingual_thinking, xlam, openr1_math: conversations; gsm8k: prompts)

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
from data.mappings import MAPPINGS, mapped
from data.harmony import (
    REASONING_EFFORTS,
    DeveloperContent,
    Message,
    SystemContent,
    Tool,
    ToolNamespace,
    function_tools,
)

def _mappings(kind: str) -> tuple[str, ...]:
    return tuple(name for name, m in MAPPINGS.items() if m.kind == kind)


FORMATS = ("harmony", "messages", "openai", "prompt_completion", "sharegpt", *_mappings("conversation"))
"""Conversation formats: rows to train on with supervised fine-tuning (the generic ones, then the
row mappings of public datasets in `data.mappings`)."""
PAIR_FORMATS = ("preference", *_mappings("preference"))
"""Rows of a prompt and a chosen and a rejected completion (method: dpo; `data.pipeline.load_pairs`)."""
PROMPT_FORMATS = ("prompts", *_mappings("prompts"))
"""Rows of a prompt for the model to answer, with columns for reward functions (method: grpo;
`data.pipeline.load_prompts`)."""


def generic_row(row, format: str):
    """A dataset row in one of the generic formats: mapped by `data.mappings` when `format` names
    a dataset's mapping, else as it is."""
    return mapped(row, format) if format in MAPPINGS else row


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
    body = _convert(msgs, key, instructions)
    return _head(row, instructions, _tools_column(row)) + body


def _convert(msgs: list, key: str, instructions: list[str], lo: int = 0, hi: int | None = None) -> list[Message]:
    """Messages `msgs[lo:hi]` -> Harmony messages; system/developer rows are appended to
    `instructions`. Errors name `key[i]` with i the index in `msgs`."""
    hi = len(msgs) if hi is None else hi
    body: list[Message] = []
    i = lo
    while i < hi:
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
            while i < hi and isinstance(msgs[i], Mapping) and msgs[i].get("role") == "tool":
                results.append((i, msgs[i]))
                i += 1
            body += _pair_calls(calls, results, key)
        elif role == "tool":
            raise _err(f"{what} is a tool result with no tool call before it", "tool result without call")
        else:
            raise _err(f"{what}.role must be system, developer, user, assistant or tool, got {role!r}", "unknown role")
    return body


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


# --- preference (DPO) and prompts (GRPO) ---
#
# MESSAGES_OR_TEXT: a string (one user message in a prompt, one final answer in a completion), one
# message object, or a list of messages in the `messages` format; a JSON string of those is decoded.

_HEAD_ROLES = ("system", "developer", "user")  # messages that are never part of a completion


def _short(text, n: int = 60) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _turns(value, key: str, role: str) -> list[Mapping]:
    """MESSAGES_OR_TEXT -> a non-empty list of message objects (a text becomes one `role` message)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        # A JSON column (Parquet, CSV) of messages; text that only looks like JSON stays text.
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, Mapping) and "role" in parsed or isinstance(parsed, list) and parsed and all(
                isinstance(m, Mapping) and "role" in m for m in parsed):
            value = parsed
    if isinstance(value, str):
        if not value.strip():
            raise _err(f"{key} is empty", "empty " + key)
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise _err(f"{key} must be text, a message or a list of messages, got {type(value).__name__}", "bad " + key)
    if not value:
        raise _err(f"{key} is empty", "empty " + key)
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _err(f"{key}[{i}] must be an object, got {type(m).__name__}", "bad message")
    return value


def _same(a: Mapping, b: Mapping) -> bool:
    """Equal messages; absent and null keys are the same (Arrow fills absent struct fields with nulls)."""
    return {k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None}


def _instructions(row: Mapping) -> list[str]:
    """A `system` column is a system message before the prompt's own (-> developer instructions)."""
    system = row.get("system")
    if system is None or system == "":
        return []
    return [_text(system, "system")]


def _prompt(row: Mapping, msgs: list, key: str, hi: int | None = None) -> list[Message]:
    """System, developer (with the row's effort, developer, system and tools columns) and the
    prompt's messages `msgs[:hi]`."""
    instructions = _instructions(row)
    body = _convert(msgs, key, instructions, 0, hi)
    if body and body[-1].role == "assistant" and body[-1].recipient is not None:
        raise _err(f"{key} ends with a tool call awaiting its result (add the tool's result)", "bad prompt")
    return _head(row, instructions, _tools_column(row)) + body


def _completion(msgs: list, key: str, lo: int) -> list[Message]:
    """`msgs[lo:]`: one assistant turn (assistant messages, tool results after its calls)."""
    for i in range(lo, len(msgs)):
        role = msgs[i].get("role")
        if role in _HEAD_ROLES:
            raise _err(f"{key}[{i}] is a {role} message, but {key} holds the completion only: the assistant's "
                       "messages (and tool results after its calls). Give the prompt in 'prompt', or chosen and "
                       "rejected as whole conversations that differ only in the assistant's reply", "bad completion")
    if msgs[lo].get("role") != "assistant":
        raise _err(f"{key}[{lo}] must be an assistant message (a completion starts with the assistant), "
                   f"got {msgs[lo].get('role')!r}", "bad completion")
    out = _convert(msgs, key, [], lo)
    if out[-1].role != "assistant":
        raise _err(f"{key} ends with a tool result: a completion ends with the assistant's answer or a tool call",
                   "bad completion")
    if any(m.channel == "final" for m in out[:-1]):
        raise _err(f"{key} has a final answer before its end: a completion is one assistant turn", "bad completion")
    if not any(isinstance(m.content, str) and m.content for m in out):
        raise _err(f"{key} is empty", f"empty {key}")
    return out


def preference_conversations(row: Mapping) -> tuple[list[Message], list[Message], list[Message]]:
    """A preference row -> (prompt, chosen, rejected) Harmony messages; prompt + chosen and
    prompt + rejected are the two conversations to render.

    Explicit form: `prompt` (text = one user message, or messages), `chosen` and `rejected` (text =
    the final answer, one assistant message, or a list of assistant messages and tool results).
    Implicit form: chosen and rejected are whole conversations (they hold system, developer or user
    messages, as in HuggingFaceH4/ultrafeedback_binarized); the prompt is the messages they share
    from the start, and a `prompt` column, if any, must agree with it (a text: its last user message).
    Row columns `system`, `developer`, `tools` and `reasoning_effort` apply to the prompt.
    """
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise _err(f"preference row missing {key!r} (columns: {', '.join(map(str, row)) or 'none'})",
                       f"missing {key}")
    chosen = _turns(row["chosen"], "chosen", "assistant")
    rejected = _turns(row["rejected"], "rejected", "assistant")
    if not any(m.get("role") in _HEAD_ROLES for m in chosen + rejected):
        if row.get("prompt") is None:
            raise _err(f"preference row missing 'prompt' (columns: {', '.join(map(str, row))}), and chosen and "
                       "rejected are completions, not whole conversations", "missing prompt")
        prompt = _turns(row["prompt"], "prompt", "user")
        return _prompt(row, prompt, "prompt"), _completion(chosen, "chosen", 0), _completion(rejected, "rejected", 0)

    n = 0
    while n < min(len(chosen), len(rejected)) and _same(chosen[n], rejected[n]):
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise _err("chosen and rejected are the same conversation", "same chosen and rejected")
    if n == 0:
        whole = [k for k, msgs in (("chosen", chosen), ("rejected", rejected))
                 if any(m.get("role") in _HEAD_ROLES for m in msgs)]
        if len(whole) == 1:
            other = "rejected" if whole == ["chosen"] else "chosen"
            raise _err(f"{whole[0]} holds system, developer or user messages (a whole conversation) but {other} "
                       "does not: give both as completions with a 'prompt', or both as whole conversations",
                       "bad completion")
        raise _err("chosen and rejected share no prompt: their first messages differ", "prompt disagrees")
    given = row.get("prompt")
    if isinstance(given, str) and not given.strip():
        given = None  # an empty prompt column says nothing
    if isinstance(given, str) and given.lstrip()[:1] in ("[", "{"):
        given = _turns(given, "prompt", "user")
        given = given[0]["content"] if len(given) == 1 and given[0].get("role") == "user" else given
    if isinstance(given, str):
        users = [m for m in chosen[:n] if m.get("role") == "user"]
        last = _text(users[-1].get("content"), "chosen.content") if users else None
        if last is None or last.strip() != given.strip():
            said = f"its last user message is {_short(last)}" if users else "they share no user message"
            raise _err(f"prompt and chosen disagree: 'prompt' is {_short(given)}, but chosen and rejected are whole "
                       f"conversations whose shared start is the prompt, and {said}", "prompt disagrees")
    elif isinstance(given, (list, Mapping)):
        given = [given] if isinstance(given, Mapping) else given
        tail = chosen[n - len(given):n]
        if len(given) > n or not all(isinstance(g, Mapping) and _same(g, m) for g, m in zip(given, tail)):
            raise _err(f"prompt and chosen disagree: the 'prompt' messages are not the end of the {n} messages "
                       "chosen and rejected share (their prompt)", "prompt disagrees")
    elif given is not None:
        raise _err(f"prompt must be text or messages, got {type(given).__name__}", "bad prompt")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if n == len(msgs):
            raise _err(f"{key} is empty: it ends where the messages chosen and rejected share end", f"empty {key}")
    return _prompt(row, chosen, "chosen", n), _completion(chosen, "chosen", n), _completion(rejected, "rejected", n)


def prompt_conversation(row: Mapping) -> list[Message]:
    """A prompts row -> the Harmony messages of its `prompt` (text = one user message, or messages),
    with the row's `system`, `developer`, `tools` and `reasoning_effort` columns."""
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    if row.get("prompt") is None:
        raise _err(f"prompts row missing 'prompt' (columns: {', '.join(map(str, row)) or 'none'})", "missing prompt")
    return _prompt(row, _turns(row["prompt"], "prompt", "user"), "prompt")


CONVERTERS: dict[str, Callable[[Mapping], list[Message]]] = {
    "harmony": from_harmony,
    "messages": from_messages,
    "openai": from_messages,
    "prompt_completion": from_prompt_completion,
    "sharegpt": from_sharegpt,
    **{name: from_messages for name in _mappings("conversation")},  # mappings give `messages` rows
}


def to_conversation(row: Mapping, format: str) -> list[Message]:
    """One row -> Harmony messages. Raises `DataError` saying what is wrong."""
    if format not in CONVERTERS:
        raise DataError(f"unknown format {format!r} (expected auto or one of {', '.join(FORMATS)})", "bad option")
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    return CONVERTERS[format](generic_row(row, format))


def detect_format(row: Mapping) -> tuple[str, str]:
    """(format, why) from one row's shape: one of FORMATS, PAIR_FORMATS or PROMPT_FORMATS."""
    if not isinstance(row, Mapping):
        raise _err(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    if "chosen" in row and "rejected" in row:
        return "preference", "'chosen' and 'rejected' columns"
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
    if "prompt" in row:
        return "prompts", "a 'prompt' column and no completion"
    raise _err(f"cannot tell the format from the columns {sorted(row)}; pass --format", "unknown format")


def announce(format: str, why: str, where: str) -> None:
    print(f"data: format auto -> {format} ({why} in {where})", file=sys.stderr)
