"""Recipes for public datasets: each fixture (tests/fixtures/, rows written by us in the dataset's
published schema) renders exactly like the conversation built by hand with openai-harmony, bad rows
are named, and every recipe trains a few steps with `gptoss-ft train` on its fixture."""

import json

import pytest

pytest.importorskip("openai_harmony")
from harmony_oracle import (ENC, assert_pair, assert_renders_like, assistant, call, developer,  # noqa: E402
                            oracle_prompt, system, user)
from openai_harmony import ReasoningEffort  # noqa: E402

from data import DataError, load_examples, load_pairs, load_prompts  # noqa: E402
from data.mappings import MAPPINGS  # noqa: E402

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def fixture_rows(name):
    path = FIXTURES / name
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- Multilingual-Thinking: reasoning language in the developer instructions ---

def test_multilingual_thinking_renders_like_the_cookbook_conversation():
    rows = fixture_rows("multilingual_thinking.jsonl")
    for row in rows:
        instructions = f"reasoning language: {row['reasoning_language']}"
        if row["developer"]:
            instructions += "\n\n" + row["developer"]
        want = [developer(instructions), user(row["user"]), assistant(row["analysis"], "analysis"),
                assistant(row["final"], "final")]
        got = assert_renders_like(row, "multilingual_thinking", want)
        # the dataset's own messages column, read as plain messages, is the same conversation
        same, _ = load_examples([{"messages": row["messages"]}], "messages")
        assert [(e.input_ids, e.loss_mask) for e in same] == [(e.input_ids, e.loss_mask) for e in got]
    text = ENC.decode_utf8(load_examples(FIXTURES / "multilingual_thinking.jsonl", "multilingual_thinking")[0][0].input_ids)
    assert "# Instructions\n\nreasoning language: French\n\nYou are an AI chatbot" in text


# --- xlam: tools as Harmony function declarations, answers as commentary calls ---

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "description": "City name, e.g. Paris.", "default": "Paris"},
    "units": {"type": "string", "description": "celsius or fahrenheit."}}}
STOCK = {"type": "object", "properties": {"symbol": {"type": "string", "description": "Ticker symbol."}},
         "required": ["symbol"]}
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "description": "Free-text search."},
    "categories": {"type": "array", "items": {"type": "integer"}, "description": "Category ids to restrict to."},
    "price_range": {"type": "array", "items": {"type": "number"}, "description": "Min and max price."},
    "filters": {"type": "object", "description": 'Attribute filters, e.g. {"color": "red"}.', "default": {}},
    "in_stock": {"type": "boolean", "description": "Only products in stock.", "default": True},
    "limit": {"type": "integer", "description": "Maximum results.", "default": 10},
    "on_result": {"description": "Callback for each result."}}, "required": ["query", "categories"]}
NOW = None  # no parameters: declared `() => any`


def test_xlam_tools_and_calls_render_like_openai_harmony():
    rows = fixture_rows("xlam_function_calling_60k.json")
    weather = ("get_weather", "Current weather for a city.", WEATHER)
    stock = ("stock_quote", "Latest quote of a ticker.", STOCK)
    search = ("search_products", json.loads(rows[2]["tools"])[0]["description"], SEARCH)
    now = ("current_time", "The current UTC time.", NOW)
    cases = [
        [developer(None, [weather, stock]), user(rows[0]["query"]),
         call("get_weather", '{"city":"Tokyo","units":"celsius"}')],
        # two calls in one answer: one message each, back to back, both trained
        [developer(None, [stock]), user(rows[1]["query"]), call("stock_quote", '{"symbol":"AAPL"}'),
         call("stock_quote", '{"symbol":"ZURN.SW"}')],
        [developer(None, [search, now]), user(rows[2]["query"]), call("search_products", json.dumps(
            {"query": "running shoes", "categories": [12], "price_range": [0, 80], "filters": {"color": "red"},
             "limit": 5}, separators=(",", ":")))],
        [developer(None, [now, weather]), user(rows[3]["query"]), call("current_time", "{}")],
    ]
    for row, want in zip(rows, cases):
        got = assert_renders_like(row, "xlam", want)
        assert all(any(e.loss_mask) for e in got)
    examples, _ = load_examples(rows[1:2], "xlam")
    text = ENC.decode_utf8(examples[-1].input_ids)
    assert text.count("<|call|>") == 2 and "to=functions.stock_quote" in text
    # the declarations are the TypeScript-like ones: optional marks, arrays, defaults, a no-argument tool
    text = ENC.decode_utf8(load_examples(rows[2:3], "xlam")[0][0].input_ids)
    for piece in ("categories: number[],", "price_range?: number[],", "in_stock?: boolean, // default: true",
                  "on_result?: any,", "type current_time = () => any;"):
        assert piece in text, piece


def test_xlam_empty_answers_are_an_error_or_skipped_and_counted():
    path = FIXTURES / "xlam_function_calling_60k.json"
    with pytest.raises(DataError, match=r"xlam_function_calling_60k.json item 4: 'answers' is empty") as e:
        load_examples(path, "xlam")
    assert e.value.reason == "no tool call"
    examples, report = load_examples(path, "xlam", on_error="skip")
    assert report.skipped == {"no tool call": 1} and {e.row for e in examples} == {0, 1, 2, 3}


# --- OpenR1-Math: the first verified, complete generation; reasoning in analysis, high effort ---

def test_openr1_math_trains_the_first_verified_complete_generation():
    path = FIXTURES / "openr1_math.jsonl"
    rows = fixture_rows("openr1_math.jsonl")
    want = {
        0: ("Subtract 3: $2x = 8$, so $x = 4$. Check: $2\\cdot 4 + 3 = 11$.", "The solution is $\\boxed{4}$."),
        1: ("Gauss: $n(n+1)/2 = 10 \\cdot 11 / 2 = 55$.", "The sum is $\\boxed{55}$."),  # the first is wrong
        # the first is verified but cut off (reasoning incomplete, finish "length"); the second has the judge's verdict
        2: ("The square root of 144 is 12; minus 3 gives 9.", "**9**"),
    }
    for i, (thinking, answer) in want.items():
        assert_renders_like(rows[i], "openr1_math", [system(ReasoningEffort.HIGH), user(rows[i]["problem"]),
                                                     assistant(thinking, "analysis"), assistant(answer, "final")])
    with pytest.raises(DataError, match=r"openr1_math.jsonl:4: none of the 2 generations is verified and complete"):
        load_examples(path, "openr1_math")
    _, report = load_examples(path, "openr1_math", on_error="skip")
    assert report.skipped == {"no verified generation": 1} and report.examples == 3


# --- UltraFeedback (DPO): the generic preference format reads its rows as they are ---

def test_ultrafeedback_binarized_pairs_match_openai_harmony():
    for name in ("ultrafeedback_binarized_train_prefs.jsonl", "ultrafeedback_binarized_test_prefs.jsonl"):
        pairs, report = load_pairs(FIXTURES / name)
        rows = fixture_rows(name)
        assert report.examples == len(rows) and not report.skipped
        for pair, row in zip(pairs, rows):
            assert_pair(pair, [user(row["prompt"])], [assistant(row["chosen"][-1]["content"], "final")],
                        [assistant(row["rejected"][-1]["content"], "final")])


# --- gsm8k (GRPO): question -> prompt, the number after #### -> the answer column ---

def test_gsm8k_prompts_and_reference_answers():
    prompts, report = load_prompts(FIXTURES / "gsm8k_train.jsonl", "gsm8k")
    rows = fixture_rows("gsm8k_train.jsonl")
    assert report.format == "gsm8k" and report.examples == len(rows)
    for p, row in zip(prompts, rows):
        assert p.prompt == oracle_prompt([user(row["question"])])
        assert p.columns["solution"] == row["answer"].rpartition("####")[0].strip()
    assert [p.columns["answer"] for p in prompts] == ["72", "10", "1550", "3"]
    # low effort, as the recipe asks
    low, _ = load_prompts(FIXTURES / "gsm8k_train.jsonl", "gsm8k", reasoning_effort="low")
    assert low[0].prompt == oracle_prompt([system(ReasoningEffort.LOW), user(rows[0]["question"])])


# --- bad rows in each schema: file, row and reason ---

BAD = [
    ("multilingual_thinking", {"reasoning_language": "French", "developer": "", "user": "hi", "analysis": "a"},
     "missing final", "no 'final' column"),
    ("multilingual_thinking", {"reasoning_language": "", "developer": "", "user": "hi", "analysis": "a", "final": "b"},
     "empty reasoning_language", "'reasoning_language' is empty"),
    ("xlam", {"id": 1, "query": "q", "answers": "[{\"name\": \"f\"", "tools": "[]"}, "invalid JSON",
     "'answers' is not valid JSON"),
    ("xlam", {"id": 1, "query": "q", "answers": '[{"name": "g", "arguments": {}}]',
              "tools": '[{"name": "f", "description": "", "parameters": {}}]'}, "unknown tool",
     "answers[0] calls 'g', which is not among the row's tools (f)"),
    ("xlam", {"id": 1, "query": "q", "answers": "[]", "tools": '[{"description": "x"}]'}, "bad tools",
     "tools[0]: a tool needs a name"),
    ("openr1_math", {"problem": "p", "generations": "<think>x</think>y"}, "bad generations",
     "'generations' must be list, got str"),
    ("openr1_math", {"problem": "p", "generations": ["no think tags"], "correctness_math_verify": [True]},
     "bad generation", "generations[0] is verified but has no </think>"),
    ("gsm8k", {"question": "q", "answer": "42"}, "no reference answer", "does not end with '#### N'"),
    ("gsm8k", {"answer": "#### 1"}, "missing question", "no 'question' column"),
]


@pytest.mark.parametrize("fmt, row, reason, message", BAD)
def test_bad_rows_name_file_line_and_reason(tmp_path, fmt, row, reason, message):
    path = tmp_path / "rows.jsonl"
    good = fixture_rows({"multilingual_thinking": "multilingual_thinking.jsonl", "xlam": "xlam_function_calling_60k.json",
                         "openr1_math": "openr1_math.jsonl", "gsm8k": "gsm8k_train.jsonl"}[fmt])[0]
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    load = load_prompts if MAPPINGS[fmt].kind == "prompts" else load_examples
    with pytest.raises(DataError) as e:
        load(path, fmt)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    assert e.value.reason == reason
    _, report = load(path, fmt, on_error="skip")
    assert report.skipped == {reason: 1} and report.examples >= 1


def test_ultrafeedback_bad_row_is_named(tmp_path):
    row = fixture_rows("ultrafeedback_binarized_train_prefs.jsonl")[0]
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": []}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2: rejected is empty"):
        load_pairs(path)


def test_mapping_kind_must_suit_the_loader():
    with pytest.raises(DataError, match="format 'gsm8k' is not for supervised fine-tuning"):
        load_examples(FIXTURES / "gsm8k_train.jsonl", "gsm8k")
    with pytest.raises(DataError, match="format must be one of prompts, gsm8k, got 'xlam'"):
        load_prompts(FIXTURES / "gsm8k_train.jsonl", "xlam")
