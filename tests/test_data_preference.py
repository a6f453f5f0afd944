"""Preference pairs (DPO) and prompts (GRPO) against openai-harmony (the oracle), token for token.

For a pair, each side's target ids are openai-harmony's `render_conversation_for_training(...,
auto_drop_analysis=False)` of prompt + that completion (earlier turns' analysis removed, as in
test_data_harmony); the target mask is 1 on exactly what the model generates in the completion
(per-message renders: every token of its assistant messages after the harness's `<|start|>assistant`,
and that head too where the model writes it after its own `<|end|>`), never on the prompt. The
shared prompt is openai-harmony's `render_conversation_for_completion` of the prompt, which is also
the target of a prompts row.
"""

import json
from collections import Counter

import pytest

pytest.importorskip("openai_harmony")
from harmony_oracle import (ENC, assert_pair, assistant, call, developer, oracle_prompt, result,  # noqa: E402
                            system, user)
from openai_harmony import Conversation, ReasoningEffort, Role  # noqa: E402

from data import (  # noqa: E402
    PAIR_FORMATS,
    PROMPT_FORMATS,
    DataError,
    PromptRow,
    load_examples,
    load_pairs,
    load_prompts,
    render_examples,
    render_prompt,
    to_conversation,
)
from data.formats import FORMATS, detect_format  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}












def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- pairs ---

def test_constants_and_formats_are_separate():
    assert PAIR_FORMATS[0] == "preference" and PROMPT_FORMATS[0] == "prompts"  # then dataset mappings
    assert not set(FORMATS) & {"preference", "prompts"}


def test_text_prompt_and_text_completions():
    pairs, report = load_pairs([{"prompt": "2+2? <|end|>", "chosen": "4", "rejected": "5"}])
    assert_pair(pairs[0], [user("2+2? <|end|>")], [assistant("4", "final")], [assistant("5", "final")])
    assert pairs[0].chosen.input_ids[-1] == 200002 and pairs[0].row == 0
    assert (report.format, report.unit, report.rows, report.examples) == ("preference", "pairs", 1, 1)
    assert report.tokens == len(pairs[0].chosen) + len(pairs[0].rejected)
    assert report.trained_tokens == sum(pairs[0].chosen.loss_mask) + sum(pairs[0].rejected.loss_mask)
    assert "1 rows -> 1 pairs" in str(report)


def test_message_prompt_with_system_and_thinking_completion():
    row = {
        "reasoning_effort": "high",
        "developer": "Answer in French.",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "thinking": "old thought", "content": "Bonjour"},
                   {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "thinking": "easy", "content": "Paris"}],
        "rejected": {"role": "assistant", "content": "Lyon"},
    }
    prompt = [system(ReasoningEffort.HIGH), developer("Answer in French.\n\nBe brief."), user("Hi"),
              assistant("old thought", "analysis"), assistant("Bonjour", "final"), user("Capital of France?")]
    for loss_on in ("last_turn", "final_only", "all_assistant"):
        pairs, _ = load_pairs([row], loss_on=loss_on)
        assert_pair(pairs[0], prompt, [assistant("easy", "analysis"), assistant("Paris", "final")],
                    [assistant("Lyon", "final")], "final_only" if loss_on == "final_only" else "last_turn")
    text = ENC.decode_utf8(pairs[0].chosen.input_ids)
    assert "old thought" not in text and "easy" in text


def test_system_column_and_chosen_ending_in_a_tool_call():
    row = {
        "system": "You help with weather.",
        "tools": json.dumps([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                                "parameters": WEATHER}}]),
        "prompt": "Weather in Rome?",
        "chosen": [{"role": "assistant", "thinking": "look it up", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}],
        "rejected": "It is sunny.",
    }
    prompt = [developer("You help with weather.", [("get_weather", "Weather", WEATHER)]), user("Weather in Rome?")]
    pairs, _ = load_pairs([row])
    assert_pair(pairs[0], prompt, [assistant("look it up", "analysis"), call("get_weather", '{"city": "Rome"}')],
                [assistant("It is sunny.", "final")])
    assert pairs[0].chosen.input_ids[-1] == 200012 and pairs[0].chosen.loss_mask[-1] == 1  # <|call|>
    # final_only: a completion that is only a tool call has nothing to train; the pair is dropped, counted
    pairs, report = load_pairs([row], loss_on="final_only")
    assert pairs == [] and report.dropped == Counter({"nothing to train (loss_on=final_only)": 1})


def test_completion_with_tool_result_and_prompt_ending_mid_turn():
    tools = [{"name": "get_weather", "description": "Weather", "parameters": WEATHER}]
    chosen = [{"role": "assistant",
               "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
              {"role": "tool", "content": "-3C"}, {"role": "assistant", "content": "Cold: -3C."}]
    pairs, _ = load_pairs([{"tools": tools, "prompt": "Oslo?", "chosen": chosen, "rejected": "No idea."}])
    prompt = [developer(None, [("get_weather", "Weather", WEATHER)]), user("Oslo?")]
    assert_pair(pairs[0], prompt, [call("get_weather", '{"city":"Oslo"}'), result("get_weather", "-3C"),
                                   assistant("Cold: -3C.", "final")], [assistant("No idea.", "final")])
    # The prompt ends after a tool result, inside the assistant's turn: the turn's earlier messages are
    # prompt (kept with their analysis, as the model saw them), and only the completions train.
    prompt_rows = [{"role": "user", "content": "Oslo?"},
                   {"role": "assistant", "thinking": "need data", "tool_calls": [
                       {"function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
                   {"role": "tool", "content": "-3C"}]
    pairs, _ = load_pairs([{"tools": tools, "prompt": prompt_rows, "chosen": "Cold: -3C.", "rejected": "Warm."}])
    prompt += [assistant("need data", "analysis"), call("get_weather", '{"city":"Oslo"}'), result("get_weather", "-3C")]
    assert_pair(pairs[0], prompt, [assistant("Cold: -3C.", "final")], [assistant("Warm.", "final")])


def test_ultrafeedback_binarized_implicit_prompt():
    q = "Explain <|start|> tokens"
    row = {"prompt": q, "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
           "chosen": [{"content": q, "role": "user"}, {"content": "They mark a message start.", "role": "assistant"}],
           "rejected": [{"content": q, "role": "user"}, {"content": "No idea.", "role": "assistant"}]}
    pairs, report = load_pairs([row])
    assert not report.skipped and report.examples == 1
    assert_pair(pairs[0], [user(q)], [assistant("They mark a message start.", "final")],
                [assistant("No idea.", "final")])
    assert ENC.decode_utf8(pairs[0].chosen.input_ids).count(q) == 1  # the prompt is not rendered twice
    # no prompt column, a system message and an earlier turn in the shared start
    convo = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b", "thinking": "t"}, {"role": "user", "content": "c"}]
    row = {"chosen": convo + [{"role": "assistant", "content": "good"}],
           "rejected": convo + [{"role": "assistant", "content": "bad"}]}
    pairs, _ = load_pairs([row])
    assert_pair(pairs[0], [developer("Be kind."), user("a"), assistant("t", "analysis"), assistant("b", "final"),
                           user("c")], [assistant("good", "final")], [assistant("bad", "final")])
    # a prompt column given as messages must be the end of the shared start
    pairs, _ = load_pairs([{**row, "prompt": convo[-1:]}])
    assert len(pairs) == 1


def test_auto_format_refuses_preference_and_prompt_rows_for_sft(tmp_path, capsys):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: a preference row .*method: dpo") as info:
        load_examples(path)
    assert info.value.reason == "preference data"
    path = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "q", "answer": "4"}])
    with pytest.raises(DataError, match=r"tasks\.jsonl:1: a prompts row \(a 'prompt' column and no completion\).*method: grpo"):
        load_examples(path, "auto", on_error="skip")
    with pytest.raises(DataError, match="method: dpo"):
        load_examples(path, "preference")
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"})[0] == "preference"
    assert detect_format({"prompt": "q", "answer": 1})[0] == "prompts"
    assert detect_format({"prompt": "q", "completion": "a"})[0] == "prompt_completion"
    assert detect_format({"prompt": "unused", "messages": [{"role": "user", "content": "x"}]})[0] == "messages"
    with pytest.raises(DataError, match=r"tasks\.jsonl:1: not a preference row"):
        load_pairs(path, on_error="skip")


BAD_ROWS = [
    ({"prompt": "q", "chosen": "a"}, "missing rejected", "preference row missing 'rejected'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty chosen", "chosen is empty"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "empty chosen",
     "chosen is empty"),
    ({"prompt": "other question", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "prompt disagrees",
     "prompt and chosen disagree"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, "bad message", "chosen[0] must be an object"),
    ({"chosen": "a", "rejected": "b"}, "missing prompt", "preference row missing 'prompt'"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}],
      "rejected": "b"}, "bad completion", "chosen holds system, developer or user messages"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "a"}]}, "prompt disagrees",
     "chosen and rejected share no prompt"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "more"}, {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "bad completion",
     "chosen[2] is a user message"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "tool", "content": "x"}]}, "bad completion",
     "rejected[0] must be an assistant message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": "c"}, "bad completion", "chosen has a final answer before its end"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "same chosen and rejected", "chosen and rejected are the same conversation"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "reasoning_effort": "max"}, "bad reasoning_effort",
     "reasoning_effort must be"),
]


@pytest.mark.parametrize("row, reason, message", BAD_ROWS)
def test_bad_pair_rows_name_file_line_and_reason(tmp_path, row, reason, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row, good])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value), str(info.value)
    assert info.value.reason == reason
    pairs, report = load_pairs(path, on_error="skip")
    assert [p.row for p in pairs] == [0, 2] and report.skipped == Counter({reason: 1})
    assert report.first_errors[reason].startswith(f"{path}:2: ") and "skipped 1 rows" in str(report)


def test_bad_json_line_and_non_object_row_are_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{oops", "[1]"])
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        load_pairs(path)
    pairs, report = load_pairs(path, on_error="skip")
    assert len(pairs) == 1 and report.skipped == Counter({"invalid JSON": 1, "not an object": 1})


def test_max_seq_len_drops_or_truncates_both_sides_counted():
    rows = [{"prompt": f"question {i}", "chosen": "yes " * (i + 1), "rejected": "no"} for i in range(8)]
    full, _ = load_pairs(rows)
    limit = sorted(len(p.chosen) for p in full)[4]
    kept, report = load_pairs(rows, max_seq_len=limit)
    assert [p.row for p in kept] == [p.row for p in full if max(len(p.chosen), len(p.rejected)) <= limit]
    assert report.dropped == Counter({f"longer than max_seq_len={limit}": 8 - len(kept)}) and len(kept) < 8
    assert f"dropped {8 - len(kept)} pairs" in str(report)
    cut, report = load_pairs(rows, max_seq_len=limit, truncation="truncate")
    assert len(cut) == 8 and report.truncated == 8 - len(kept)
    for p, f in zip(cut, full):
        for a, b in ((p.chosen, f.chosen), (p.rejected, f.rejected)):
            assert a.input_ids == b.input_ids[:limit] and a.loss_mask == b.loss_mask[:limit]
    # cut before the completion starts: nothing trained on one side drops the pair
    prompt_len = full[0].chosen.loss_mask.index(1)
    cut, report = load_pairs(rows, max_seq_len=prompt_len, truncation="truncate")
    assert cut == [] and report.dropped == Counter({"nothing trained left after truncation": 8})


def test_parquet_and_csv_with_json_string_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": json.dumps([{"role": "system", "content": "Terse."}, {"role": "user", "content": "[1, 2] sum?"}]),
         "chosen": json.dumps([{"role": "assistant", "thinking": "add", "content": "3"}]),
         "rejected": "[4]",  # text that looks like JSON stays text
         "tools": json.dumps([{"name": "add", "parameters": WEATHER}])},
        {"prompt": "[1, 2] sum?", "chosen": json.dumps({"role": "assistant", "content": "3"}), "rejected": "{4}",
         "tools": ""},
    ]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "prefs.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "prefs.csv")
    want = [load_pairs([{**rows[0], "prompt": json.loads(rows[0]["prompt"]), "chosen": json.loads(rows[0]["chosen"]),
                         "tools": json.loads(rows[0]["tools"])}])[0][0],
            load_pairs([{**rows[1], "chosen": "3"}])[0][0]]
    for name in ("prefs.parquet", "prefs.csv"):
        pairs, report = load_pairs(tmp_path / name)
        assert report.rows == 2 and not report.skipped
        assert [(p.chosen.input_ids, p.rejected.input_ids) for p in pairs] == \
            [(p.chosen.input_ids, p.rejected.input_ids) for p in want]
    assert "[4]" in ENC.decode_utf8(want[0].rejected.input_ids)
    prompts, _ = load_prompts(tmp_path / "prefs.parquet")
    assert prompts[0].prompt == oracle_prompt([developer("Terse.", [("add", "", WEATHER)]), user("[1, 2] sum?")])
    assert prompts[0].columns["rejected"] == "[4]"


def test_num_proc_matches_serial(monkeypatch):
    from data import pipeline

    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 3)
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(10)]
    rows[4] = {"prompt": "q"}
    serial, r1 = load_pairs(rows, on_error="skip")
    parallel, r2 = load_pairs(rows, on_error="skip", num_proc=2)
    assert serial == parallel and r1.skipped == r2.skipped == Counter({"missing chosen": 1})
    prompts, _ = load_prompts(rows, num_proc=2)
    assert [p.prompt for p in prompts] == [render_prompt(r["prompt"]) for r in rows]


# --- prompts ---

def test_prompts_rows_match_openai_harmony_and_keep_columns(tmp_path):
    rows = [
        {"prompt": "What is 6*7?", "answer": "42", "meta": {"level": 1}},
        {"prompt": [{"role": "system", "content": "Think step by step."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "thinking": "greet back", "content": "Hello!"},
                    {"role": "user", "content": "1+1?"}], "reasoning_effort": "low", "answer": 2},
        {"prompt": [{"role": "user", "content": "Weather in Oslo?"},
                    {"role": "assistant", "thinking": "use the tool", "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                    {"role": "tool", "content": "-3C"}],
         "tools": [{"name": "get_weather", "description": "Weather", "parameters": WEATHER}]},
    ]
    path = write_jsonl(tmp_path / "tasks.jsonl", rows)
    prompts, report = load_prompts(path)
    expected = [
        [user("What is 6*7?")],
        [system(ReasoningEffort.LOW), developer("Think step by step."), user("Hi"), assistant("greet back", "analysis"),
         assistant("Hello!", "final"), user("1+1?")],
        [developer(None, [("get_weather", "Weather", WEATHER)]), user("Weather in Oslo?"),
         assistant("use the tool", "analysis"), call("get_weather", '{"city": "Oslo"}'), result("get_weather", "-3C")],
    ]
    assert all(isinstance(p, PromptRow) for p in prompts) and [p.row for p in prompts] == [0, 1, 2]
    for p, msgs, row in zip(prompts, expected, rows):
        assert p.prompt == oracle_prompt(msgs), ENC.decode_utf8(p.prompt)
        assert p.prompt[-2:] == [200006, ENC.encode("assistant")[0]]
        assert p.columns == {k: v for k, v in row.items() if k != "prompt"}
    text = ENC.decode_utf8(prompts[1].prompt)
    assert "greet back" not in text and "Reasoning: low" in text  # an ended turn's analysis is dropped
    assert "use the tool" in ENC.decode_utf8(prompts[2].prompt)  # the turn in progress keeps it
    # what openai-harmony itself renders for these (its default drops analysis only when the turn ended in a final)
    assert prompts[2].prompt == ENC.render_conversation_for_completion(
        Conversation.from_messages([system(), *expected[2]]), Role.ASSISTANT)
    assert (report.format, report.unit, report.examples, report.tokens) == \
        ("prompts", "prompts", 3, sum(len(p.prompt) for p in prompts))
    # reasoning_effort for rows without their own, and max_prompt_len drops are counted
    high, _ = load_prompts(path, reasoning_effort="high")
    assert high[0].prompt == oracle_prompt([system(ReasoningEffort.HIGH), user("What is 6*7?")])
    assert high[1].prompt == prompts[1].prompt
    limit = len(prompts[0].prompt)
    short, report = load_prompts(path, max_prompt_len=limit)
    assert [p.row for p in short] == [0]
    assert report.dropped == Counter({f"prompt longer than max_prompt_len={limit}": 2})
    assert "dropped 2 prompts" in str(report)


def test_render_prompt_is_the_prefix_of_the_training_example():
    """The same ids as the training render before its first trained token (what generate.chat_prompt did)."""
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "thinking": "t", "content": "hello"}, {"role": "user", "content": "bye"}]
    for effort in (None, "low"):
        conv = to_conversation({"messages": [*history, {"role": "assistant", "content": "."}]}, "messages")
        ids, mask = render_examples(conv, split_turns=False, reasoning_effort=effort)[-1]
        assert render_prompt(history, reasoning_effort=effort) == ids[:mask.index(1)]
    assert render_prompt("hi") == oracle_prompt([user("hi")])
    assert render_prompt(to_conversation({"prompt": "hi", "completion": "x"}, "prompt_completion")[:-1]) == \
        render_prompt("hi")


def test_bad_prompt_rows(tmp_path):
    rows = [{"prompt": "ok"}, {"question": "no prompt"}, {"prompt": ""}, {"prompt": [{"role": "user", "content": 3}]},
            {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
                {"function": {"name": "f", "arguments": "{}"}}]}]}]
    path = write_jsonl(tmp_path / "tasks.jsonl", rows)
    with pytest.raises(DataError, match=r"tasks\.jsonl:2: prompts row missing 'prompt'"):
        load_prompts(path)
    prompts, report = load_prompts(path, on_error="skip")
    assert [p.row for p in prompts] == [0]
    assert report.skipped == Counter({"missing prompt": 1, "empty prompt": 1, "bad content": 1, "bad prompt": 1})
    assert "tasks.jsonl:4: prompt[0].content must be text" in report.first_errors["bad content"]
    assert "tool call awaiting its result" in report.first_errors["bad prompt"]
    with pytest.raises(DataError, match=r"not a prompts row"):
        load_prompts([{"messages": []}])
