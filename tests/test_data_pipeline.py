"""Loading files, bad rows, length limits, splits, packing and collation, and the tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from data import DataError, Example, collate, get_tokenizer, load_examples, pack_examples, shuffle, train_eval_split


def chat(i, turns=1):
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {i}.{t} " + "x " * (i % 7)},
                 {"role": "assistant", "content": f"answer {i}.{t}"}]
    return {"messages": msgs}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_tokenizer_is_o200k_harmony():
    tok = get_tokenizer()
    assert tok.n_vocab == 201088
    specials = {"<|return|>": 200002, "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
                "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012, "<|endoftext|>": 199999}
    assert {s: tok.encode_single_token(s) for s in specials} == specials
    assert tok.encode_ordinary("<|start|>") == [27, 91, 5236, 91, 29]


def test_missing_vocab_error_names_both_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", "from data import get_tokenizer; get_tokenizer()"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "TIKTOKEN_ENCODINGS_BASE" in last and "TIKTOKEN_CACHE_DIR" in last


def test_library_imports_no_oracle_and_no_other_package():
    code = ("import sys, data, data.pipeline, data.formats, data.harmony, data.tokenizer; "
            "bad = [m for m in ('openai_harmony', 'model', 'finetune', 'transformers') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_jsonl_bad_line_named_and_skips_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0), "{not json", chat(1), {"messages": [{"role": "user", "content": "?"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_examples(path, "messages")
    examples, report = load_examples(str(path), "messages", on_error="skip")
    assert [e.row for e in examples] == [0, 2]
    assert dict(report.skipped) == {"invalid JSON": 1, "no assistant turn": 1}
    assert "d.jsonl:4" in report.first_errors["no assistant turn"]
    assert "skipped 2 rows" in str(report)


def test_folder_of_json_parquet_csv_matches_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [chat(i) for i in range(6)]
    write_jsonl(tmp_path / "a.jsonl", rows[:2])
    (tmp_path / "b.json").write_text(json.dumps(rows[2:4]))
    datasets.Dataset.from_list([{"messages": json.dumps(r["messages"])} for r in rows[4:5]]).to_csv(tmp_path / "c.csv")
    datasets.Dataset.from_list(rows[5:]).to_parquet(tmp_path / "d.parquet")
    examples, report = load_examples(tmp_path, "auto")
    expected, _ = load_examples(rows, "messages")
    assert report.rows == 6 and report.format == "messages"
    assert [e.input_ids for e in examples] == [e.input_ids for e in expected]


def test_missing_file_and_unknown_hub_id_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="hub failed"):
        load_examples("no-such-user/no-such-dataset-xyz")


def test_max_seq_len_drop_and_truncate_are_counted():
    rows = [chat(i) for i in range(10)]
    full, _ = load_examples(rows, "messages")
    limit = sorted(len(e) for e in full)[5]
    kept, report = load_examples(rows, "messages", max_seq_len=limit)
    assert len(kept) == sum(len(e) <= limit for e in full) and all(len(e) <= limit for e in kept)
    assert sum(report.dropped.values()) == 10 - len(kept) > 0 and "dropped" in str(report)
    cut, report = load_examples(rows, "messages", max_seq_len=limit - 3, truncation="truncate")
    assert report.truncated == sum(len(e) > limit - 3 for e in full) > 0
    assert [e.input_ids for e in cut] == [e.input_ids[:limit - 3] for e in full]
    assert [e.loss_mask for e in cut] == [e.loss_mask[:limit - 3] for e in full]


def test_final_only_turn_ending_in_a_call_is_reported_not_silent():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]}
    examples, report = load_examples([row], "messages", loss_on="final_only")
    assert examples == [] and dict(report.dropped) == {"nothing to train (loss_on=final_only)": 1}


def test_split_turns_and_num_proc():
    rows = [chat(i, turns=1 + i % 3) for i in range(1100)]
    one, _ = load_examples(rows, "messages", split_turns=False)
    many, _ = load_examples(rows, "messages")
    assert len(one) == 1100 and len(many) == sum(1 + i % 3 for i in range(1100))
    parallel, _ = load_examples(rows, "messages", num_proc=2)
    assert [(e.input_ids, e.loss_mask, e.row) for e in parallel] == [(e.input_ids, e.loss_mask, e.row) for e in many]


def test_train_eval_split_holds_out_whole_rows_reproducibly():
    examples, _ = load_examples([chat(i, turns=2) for i in range(20)], "messages")
    train, held = train_eval_split(examples, 0.25, seed=3)
    assert len({e.row for e in held}) == 5 and not {e.row for e in held} & {e.row for e in train}
    assert len(train) + len(held) == len(examples)
    assert [e.row for e in train_eval_split(examples, 0.25, seed=3)[1]] == [e.row for e in held]
    assert shuffle(range(10), 1) == shuffle(range(10), 1) != list(range(10))


def ex(n, row=0, trained=(1,)):
    return Example(list(range(1000 + 10 * row, 1000 + 10 * row + n)), [int(i in trained) for i in range(n)], row)


def test_pack_never_splits_and_fits():
    examples = [ex(n, row=i) for i, n in enumerate([5, 3, 8, 2, 7, 1, 4, 6])]
    rows = pack_examples(examples, 8)
    assert all(sum(len(e) for e in r) <= 8 for r in rows)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in examples)
    assert len(rows) == 5  # 36 tokens: best fit reaches the minimum of ceil(36/8) rows
    with pytest.raises(DataError, match="does not fit seq_len=4"):
        pack_examples(examples, 4)


def test_collate_labels_positions_padding():
    a, b, c = ex(3, 0, trained=(1, 2)), ex(2, 1, trained=(1,)), ex(4, 2, trained=(3,))
    batch = collate([[a, b], c], pad_to=6)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}
    assert batch["input_ids"].tolist() == [[1000, 1001, 1002, 1010, 1011, 199999],
                                           [1020, 1021, 1022, 1023, 199999, 199999]]
    assert batch["labels"].tolist() == [[-100, 1001, 1002, -100, 1011, -100], [-100, -100, -100, 1023, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert batch["num_tokens"].item() == 9
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate([a, c])["input_ids"].shape == (2, 4)
    with pytest.raises(DataError):
        collate([c], pad_to=3)


def test_real_examples_start_with_an_untrained_system_start():
    examples, _ = load_examples([chat(i, turns=2) for i in range(5)], "messages")
    batch = collate(pack_examples(examples, 512))
    starts = batch["position_ids"] == 0
    assert (batch["input_ids"][starts] == 200006).all() and (batch["labels"][starts] == -100).all()
