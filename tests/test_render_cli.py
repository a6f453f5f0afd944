"""`gptoss-ft render`: JSONL in input order, the human view, and bad rows as one clean line."""

import json

from data import load_examples
from finetune.cli import main

ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "thinking": "t", "content": "hello"},
                  {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]},
    {"prompt": "unused column", "messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
]


def write(tmp_path, rows):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_matches_the_library(tmp_path, capsys):
    path = write(tmp_path, ROWS)
    assert main(["render", str(path), "--format", "messages", "--jsonl", "--reasoning-effort", "low"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    examples, _ = load_examples(path, "messages", reasoning_effort="low")
    assert out == [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples] and len(out) == 3
    assert main(["render", str(path), "--format", "messages", "--jsonl", "--no-split-turns",
                 "--loss-on", "final_only"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    examples, _ = load_examples(path, "messages", split_turns=False, loss_on="final_only")
    assert out == [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples] and len(out) == 2


def test_human_view_shows_text_and_counts(tmp_path, capsys):
    path = write(tmp_path, ROWS)
    assert main(["render", str(path), "--format", "messages", "--limit", "1"]) == 0
    captured = capsys.readouterr()
    examples, _ = load_examples(path, "messages")
    first = examples[0]
    assert f"{len(first)} tokens, {sum(first.loss_mask)} trained" in captured.out
    assert "<|start|>assistant<|channel|>final<|message|>hello<|return|>" in captured.out
    assert "2 more examples" in captured.out and "3 examples" in captured.err


def test_bad_row_is_one_line_and_skip_is_reported(tmp_path, capsys):
    path = write(tmp_path, [ROWS[0], "{oops", ROWS[1]])
    assert main(["render", str(path), "--format", "messages", "--jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptoss-ft render: error: ") and "chats.jsonl:2: invalid JSON" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["render", str(path), "--format", "messages", "--jsonl", "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and "skipped 1 rows: 1 invalid JSON" in captured.err


PAIRS = [
    {"prompt": "2+2?", "chosen": [{"role": "assistant", "thinking": "add", "content": "4"}], "rejected": "5"},
    {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
]


def test_preference_jsonl_and_human_view(tmp_path, capsys):
    from data import load_pairs

    path = write(tmp_path, PAIRS)
    pairs, _ = load_pairs(path, loss_on="final_only")
    want = [{"chosen": {"input_ids": p.chosen.input_ids, "loss_mask": p.chosen.loss_mask},
             "rejected": {"input_ids": p.rejected.input_ids, "loss_mask": p.rejected.loss_mask}} for p in pairs]
    for fmt in ("preference", "auto"):
        assert main(["render", str(path), "--format", fmt, "--jsonl", "--loss-on", "final_only"]) == 0
        captured = capsys.readouterr()
        assert [json.loads(line) for line in captured.out.splitlines()] == want
        assert "2 rows -> 2 pairs" in captured.err
    assert "format auto -> preference" in captured.err
    assert main(["render", str(path), "--format", "preference", "--limit", "1"]) == 0
    captured = capsys.readouterr()
    pairs, _ = load_pairs(path)
    chosen, rejected = pairs[0].chosen, pairs[0].rejected
    out = captured.out
    assert f"pair 0 (row 0) chosen: {len(chosen)} tokens, {sum(chosen.loss_mask)} trained" in out
    assert f"pair 0 (row 0) rejected: {len(rejected)} tokens, {sum(rejected.loss_mask)} trained" in out
    assert out.index("chosen:") < out.index("<|channel|>final<|message|>4<|return|>") < out.index("rejected:") \
        < out.index("<|channel|>final<|message|>5<|return|>")
    assert "1 more pairs" in out


def test_prompts_jsonl_and_human_view(tmp_path, capsys):
    from data import load_prompts

    rows = [{"prompt": "What is 6*7?", "answer": "42"}, {"prompt": [{"role": "user", "content": "hi"}], "id": 7}]
    path = write(tmp_path, rows)
    prompts, _ = load_prompts(path, reasoning_effort="low")
    for fmt in ("prompts", "auto"):
        assert main(["render", str(path), "--format", fmt, "--jsonl", "--reasoning-effort", "low"]) == 0
        captured = capsys.readouterr()
        out = [json.loads(line) for line in captured.out.splitlines()]
        assert out == [{"prompt_ids": p.prompt, "columns": p.columns} for p in prompts]
        assert out[0]["columns"] == {"answer": "42"} and "2 rows -> 2 prompts" in captured.err
    assert main(["render", str(path), "--format", "prompts"]) == 0
    out = capsys.readouterr().out
    assert "prompt 0 (row 0)" in out and "<|start|>user<|message|>What is 6*7?<|end|>\n<|start|>assistant\n" in out
    assert '"answer": "42"' in out


def test_bad_preference_row_is_one_line(tmp_path, capsys):
    path = write(tmp_path, [PAIRS[0], {"prompt": "q", "chosen": "a"}])
    assert main(["render", str(path), "--format", "preference", "--jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gptoss-ft render: error: {path}:2: preference row missing 'rejected' (columns: prompt, chosen)"
