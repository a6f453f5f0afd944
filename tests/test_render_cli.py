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
