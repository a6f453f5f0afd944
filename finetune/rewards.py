"""Reward functions for GRPO: how they are named, called and checked, and the built-in ones.

A reward function is called once per rollout batch as

    f(completions=[...], prompts=[...], **columns) -> list of numbers (one per completion)

- each completion is a `Completion`: a `str` holding the final-channel text ("" when the model wrote
  no final message), with `.analysis` (the analysis-channel text), `.tool_calls` (the tool-call
  messages: `.recipient`, `.content`), `.messages` (every parsed Harmony message), `.finished`
  (ended with `<|return|>`) and `.tokens` (the sampled ids);
- prompts are the rows' `prompt` values as given (text or message lists), one per completion;
- columns are the rows' other fields, each a list with one entry per completion.

`grpo.rewards` names them as "module:function" (a module on sys.path, or a path to a .py file) or
by a built-in name: exact_match, numeric_match, format. A function that cannot be imported, returns
the wrong number of values or something that is not a finite number stops the run with an error
naming the function and the row; a failing reward is never a silent zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from data.tokenizer import RETURN

from .generate import Completion as ParsedCompletion
from .generate import parse_completion
from .objectives import TrainingError


class Completion(str):
    """The final-channel text of one sampled completion, with the rest of its Harmony parse."""

    analysis: str
    tool_calls: list
    messages: list
    finished: bool
    tokens: list[int]

    @classmethod
    def from_tokens(cls, tokens: list[int]) -> "Completion":
        parsed: ParsedCompletion = parse_completion(tokens)
        c = cls(parsed.final or "")
        c.analysis, c.tool_calls, c.messages = parsed.analysis, parsed.tool_calls, parsed.messages
        c.finished, c.tokens = bool(tokens) and tokens[-1] == RETURN, list(tokens)
        return c


# -- built-ins ----------------------------------------------------------------------------------------

def _column(columns: dict, name: str, fn: str) -> list:
    if name not in columns:
        raise TrainingError(f"reward {fn} compares with the column {name!r}, which the rows do not have "
                            f"(columns: {', '.join(sorted(columns)) or 'none'})")
    return columns[name]


def exact_match(completions: Sequence[str], prompts, answer: Sequence | None = None, **columns) -> list[float]:
    """1.0 when the final answer equals the row's `answer` column (whitespace stripped), else 0.0."""
    answers = _column({"answer": answer} if answer is not None else columns, "answer", "exact_match")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    """The number a text ends its answer with: after a GSM8K-style "####" when there is one, else
    the last number in it (thousands separators ignored)."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(completions: Sequence[str], prompts, answer: Sequence | None = None, **columns) -> list[float]:
    """1.0 when the last number of the final answer equals the row's `answer` (its number after
    "####" for GSM8K rows), within 1e-6; else 0.0."""
    answers = _column({"answer": answer} if answer is not None else columns, "answer", "numeric_match")
    out = []
    for c, a in zip(completions, answers):
        got, want = _last_number(c), _last_number(str(a))
        out.append(float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def format_reward(completions: Sequence[str], prompts, **columns) -> list[float]:
    """1.0 for the shape gpt-oss answers in: analysis, then a final message ended by `<|return|>`."""
    out = []
    for c in completions:
        channels = [m.channel for m in getattr(c, "messages", [])]
        ok = getattr(c, "finished", False) and "analysis" in channels and channels[-1] == "final" \
            and channels.index("analysis") < len(channels) - 1
        out.append(float(ok))
    return out


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "numeric_match": numeric_match, "format": format_reward}


# -- loading and calling --------------------------------------------------------------------------------

def load_reward(spec: str) -> Callable:
    """A built-in name, or "module:function" where module is importable or a path to a .py file."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise TrainingError(f"grpo.rewards: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor module:function")
    module_name, fn_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error in it is theirs to see
        raise TrainingError(f"grpo.rewards: cannot import {module_name!r} for {spec!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TrainingError(f"grpo.rewards: {module_name!r} has no function {fn_name!r} ({spec!r})")
    return fn


def score(fns: dict[str, Callable], completions: list[Completion], prompts: list, columns: dict[str, list],
          where: list[str]) -> list[list[float]]:
    """Every function's rewards, `[function][completion]`, checked: one finite number per
    completion. `where`: each completion's source row, for the error messages."""
    out = []
    for name, fn in fns.items():
        try:
            values = fn(completions=completions, prompts=prompts, **columns)
        except TrainingError:
            raise
        except Exception as e:
            raise TrainingError(f"reward {name} raised {type(e).__name__}: {e} (on {where[0]} ...)") from e
        try:
            values = list(values)
        except TypeError:
            raise TrainingError(f"reward {name} returned {type(values).__name__}, expected a list of "
                                f"{len(completions)} numbers") from None
        if len(values) != len(completions):
            raise TrainingError(f"reward {name} returned {len(values)} values for {len(completions)} completions "
                                "(expected one number per completion)")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):  # bools and numpy scalars count
                raise TrainingError(f"reward {name} returned {v!r} for completion {i} of {where[i]}; "
                                    "expected a finite number")
        out.append([float(v) for v in values])
    return out
