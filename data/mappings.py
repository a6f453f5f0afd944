"""Row mappings of public datasets: one function per dataset turning its published row schema into a
row of one of our generic formats, which `data.formats` then renders. They are the one registry of
`data.format: NAME` values beyond the generic formats; recipes (recipes/*.yaml) name them.

Each mapping says what it produces (`kind`): "conversation" rows train with supervised fine-tuning
(method lora/full; a `messages` row), "preference" rows with dpo, "prompts" rows with grpo. The
choices each mapping makes for rows the dataset's card does not settle are in its docstring, and
errors name the column (the pipeline adds the file or split and the row).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from data.errors import DataError

KINDS = ("conversation", "preference", "prompts")


@dataclass(frozen=True)
class RowMapping:
    name: str
    kind: str
    """What a mapped row is: conversation (SFT), preference (DPO) or prompts (GRPO)."""
    dataset: str
    """The hub dataset whose published schema the mapping reads (its card is the reference)."""
    fn: Callable[[Mapping], dict]
    """Row of the dataset -> row of the `messages`, `preference` or `prompts` format."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"mapping {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


def _column(row: Mapping, key: str, types=(str,)):
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    if key not in row or row[key] is None:
        raise DataError(f"the row has no {key!r} column (columns: {', '.join(map(str, row)) or 'none'})",
                        f"missing {key}")
    value = row[key]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{key!r} must be {names}, got {type(value).__name__}", f"bad {key}")
    return value


def _nonempty(row: Mapping, key: str) -> str:
    value = _column(row, key)
    if not value.strip():
        raise DataError(f"{key!r} is empty", f"empty {key}")
    return value


def _json_column(row: Mapping, key: str):
    """A column that holds JSON text (xlam's `tools` and `answers`); a decoded list is accepted too."""
    value = _column(row, key, (str, list))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{key!r} is not valid JSON: {e}", "invalid JSON") from None
    if not isinstance(value, list):
        raise DataError(f"{key!r} must be a JSON list, got {type(value).__name__}", f"bad {key}")
    return value


# --- HuggingFaceH4/Multilingual-Thinking ---

def multilingual_thinking(row: Mapping) -> dict:
    """Columns reasoning_language, developer, user, analysis, final (and messages, which repeats them).

    As OpenAI's cookbook and HF's gpt-oss-recipes train it: the developer instructions are
    "reasoning language: LANG" followed by the row's developer text after a blank line, `analysis`
    is the analysis channel (in LANG) and `final` the final answer. This is exactly what the row's
    own `messages` column gives with `data.format: messages`.
    """
    language = _nonempty(row, "reasoning_language")
    developer = _column(row, "developer") if row.get("developer") is not None else ""
    instructions = f"reasoning language: {language}" + (f"\n\n{developer}" if developer.strip() else "")
    return {"messages": [
        {"role": "system", "content": instructions},
        {"role": "user", "content": _nonempty(row, "user")},
        {"role": "assistant", "thinking": _nonempty(row, "analysis"), "content": _nonempty(row, "final")},
    ]}


# --- Salesforce/xlam-function-calling-60k ---

_XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer",
               "float": "number", "number": "number", "bool": "boolean", "boolean": "boolean",
               "list": "array", "tuple": "array", "set": "array", "dict": "object", "object": "object"}


def _xlam_type(text: str) -> tuple[dict, bool]:
    """An xlam parameter type ("str", "List[int]", "int, optional", "Optional[str]") -> (JSON schema
    of the type, optional). A type with no JSON-schema counterpart ("Callable", "datetime", a union
    of different types) becomes a schema without `type`, which Harmony declares as `any`."""
    t = text.strip()
    optional = False
    if t.lower().endswith(", optional"):
        t, optional = t[: -len(", optional")].strip(), True
    if m := re.fullmatch(r"Optional\[(.*)\]", t):
        t, optional = m.group(1).strip(), True
    if m := re.fullmatch(r"(\w+)\[(.*)\]", t):
        outer, inner = m.group(1).lower(), m.group(2)
        if outer in ("list", "tuple", "set", "sequence"):
            items = inner.split(",")[0] if outer == "tuple" else inner
            return {"type": "array", "items": _xlam_type(items)[0]}, optional
        if outer == "dict":
            return {"type": "object"}, optional
        return {}, optional
    name = _XLAM_TYPES.get(t.lower())
    return ({"type": name} if name else {}), optional


def _xlam_tool(raw, what: str) -> dict:
    """An xlam tool {name, description, parameters: {NAME: {type, description, default?}}} -> an
    OpenAI function spec with a JSON-schema object (none for a tool without parameters). A parameter is required unless its type says
    optional or it has a default (xlam marks optional parameters both ways)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise DataError(f"{what}: a tool needs a name", "bad tools")
    params = raw.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise DataError(f"{what}.parameters must map parameter names to specs", "bad tools")
    properties, required = {}, []
    for pname, spec in params.items():
        if not isinstance(spec, Mapping):
            raise DataError(f"{what}.parameters[{pname!r}] must be an object", "bad tools")
        schema, optional = _xlam_type(str(spec.get("type") or ""))
        if isinstance(spec.get("description"), str) and spec["description"]:
            schema["description"] = spec["description"]
        if "default" in spec:
            schema["default"] = spec["default"]
        elif not optional:
            required.append(pname)
        properties[pname] = schema
    tool = {"name": raw["name"], "description": raw.get("description") or ""}
    if properties:  # without parameters Harmony declares a no-argument tool: `() => any`
        tool["parameters"] = {"type": "object", "properties": properties, **({"required": required} if required else {})}
    return tool


def xlam(row: Mapping) -> dict:
    """Columns query, tools and answers (JSON text): tools become the developer message's
    `functions` namespace (declared as openai-harmony declares them), each answer a commentary call
    `to=functions.NAME <|constrain|>json` with its arguments as compact JSON, as gpt-oss writes them.

    Several answers are several calls, one message each ending in `<|call|>`, in the dataset's
    order, all trained: gpt-oss emits one call per message, and xlam has no tool results to put
    between them. An empty answer list (no tool applies, as in xlam-irrelevance) has no reply to
    train: it is an error ("no tool call"), or skipped and counted with on_error: skip.
    """
    tools = [_xlam_tool(t, f"tools[{i}]") for i, t in enumerate(_json_column(row, "tools"))]
    answers = _json_column(row, "answers")
    if not answers:
        raise DataError("'answers' is empty: no tool call and no reply to train (on_error: skip leaves such "
                        "rows out, counted)", "no tool call")
    calls = []
    names = {t["name"] for t in tools}
    for i, a in enumerate(answers):
        if not isinstance(a, Mapping) or not isinstance(a.get("name"), str):
            raise DataError(f"answers[{i}] needs a name", "bad tool call")
        if a["name"] not in names:
            raise DataError(f"answers[{i}] calls {a['name']!r}, which is not among the row's tools "
                            f"({', '.join(sorted(names)) or 'none'})", "unknown tool")
        args = a.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        calls.append({"role": "assistant", "content": "",
                      "tool_calls": [{"type": "function", "function": {"name": a["name"], "arguments": args}}]})
    return {"tools": tools, "messages": [{"role": "user", "content": _nonempty(row, "query")}, *calls]}


# --- open-r1/OpenR1-Math-220k ---

def _verified(row: Mapping, i: int) -> bool:
    for key in ("correctness_math_verify", "correctness_llama"):
        flags = row.get(key)
        if isinstance(flags, list) and i < len(flags) and flags[i] is True:
            return True
    return False


def openr1_math(row: Mapping) -> dict:
    """Columns problem, generations (DeepSeek-R1 outputs "<think>...</think> answer"),
    correctness_math_verify, correctness_llama, is_reasoning_complete, finish_reasons.

    The first generation that is verified (Math-Verify, else the Llama judge the card describes for
    the rest) and complete (reasoning complete, finished with "stop") is trained: the text inside
    <think> in the analysis channel, the text after </think> as the final answer, at high reasoning
    effort. A row with no such generation is an error ("no verified generation"), skippable.
    """
    problem = _nonempty(row, "problem")
    generations = _column(row, "generations", (list,))
    complete = row.get("is_reasoning_complete") or []
    finished = row.get("finish_reasons") or []
    for i, text in enumerate(generations):
        if not _verified(row, i) or not isinstance(text, str):
            continue
        if i < len(complete) and complete[i] is False or i < len(finished) and finished[i] not in (None, "stop"):
            continue
        head, sep, answer = text.partition("</think>")
        if not sep:
            raise DataError(f"generations[{i}] is verified but has no </think> to split reasoning from answer",
                            "bad generation")
        thinking = head.strip().removeprefix("<think>").strip()
        if not thinking or not answer.strip():
            raise DataError(f"generations[{i}] has an empty {'reasoning' if not thinking else 'answer'}",
                            "bad generation")
        return {"reasoning_effort": "high", "messages": [
            {"role": "user", "content": problem},
            {"role": "assistant", "thinking": thinking, "content": answer.strip()},
        ]}
    raise DataError(f"none of the {len(generations)} generations is verified and complete", "no verified generation")


# --- openai/gsm8k ---

def gsm8k(row: Mapping) -> dict:
    """Columns question and answer (worked solution ending in "#### N"): the question is the prompt,
    and N (thousands separators removed) the `answer` column the numeric_match reward compares the
    model's final answer with; the worked solution stays available as `solution`."""
    question = _nonempty(row, "question")
    solution, sep, number = _nonempty(row, "answer").rpartition("####")
    number = number.strip().replace(",", "")
    if not sep or not number:
        raise DataError("'answer' does not end with '#### N' (the reference number)", "no reference answer")
    return {"prompt": question, "answer": number, "solution": solution.strip()}


MAPPINGS: dict[str, RowMapping] = {m.name: m for m in (
    RowMapping("multilingual_thinking", "conversation", "HuggingFaceH4/Multilingual-Thinking", multilingual_thinking),
    RowMapping("xlam", "conversation", "Salesforce/xlam-function-calling-60k", xlam),
    RowMapping("openr1_math", "conversation", "open-r1/OpenR1-Math-220k", openr1_math),
    RowMapping("gsm8k", "prompts", "openai/gsm8k", gsm8k),
)}
MAPPING_FORMATS = tuple(MAPPINGS)
"""`data.format` values that name a dataset's row mapping."""


def mapped(row, name: str) -> dict:
    """The generic row a dataset row maps to (the pipeline adds the row's location to errors)."""
    return MAPPINGS[name].fn(row)
