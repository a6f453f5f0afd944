"""Loading files, bad rows, length limits, splits, packing and collation, and the tokenizer."""

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
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


# --- data at scale: flat arrays, the render cache, packing from lengths ---

def test_examples_are_flat_arrays_with_example_views():
    rows = [chat(i, turns=1 + i % 3) for i in range(30)]
    examples, report = load_examples(rows, "messages")
    a = examples.arrays
    assert (a["input_ids"].dtype, a["loss_mask"].dtype, a["offsets"].dtype) == (np.int32, np.uint8, np.int64)
    assert len(a["input_ids"]) == a["offsets"][-1] == report.tokens == sum(len(e) for e in examples)
    assert int(a["loss_mask"].sum()) == report.trained_tokens
    e = examples[3]
    assert isinstance(e, Example) and isinstance(e.input_ids, list) and isinstance(e.input_ids[0], int)
    assert e.input_ids == a["input_ids"][a["offsets"][3]:a["offsets"][4]].tolist()
    assert examples[-1] == examples[len(examples) - 1] and list(examples[2:5]) == [examples[2], examples[3], examples[4]]
    assert list(examples[1::7]) == [examples[i] for i in range(1, len(examples), 7)]
    assert examples.lengths().tolist() == [len(x) for x in examples] and examples.num_rows == 30
    with pytest.raises(IndexError):
        examples[len(examples)]
    train, held = train_eval_split(examples, 0.2, seed=1)
    listed = train_eval_split(list(examples), 0.2, seed=1)
    assert list(train) == listed[0] and list(held) == listed[1] and held.num_rows == 6


def _best_fit(lengths, seq_len):
    """The packing rule, written the slow obvious way: longest first, into the row with the least
    room that fits (earliest on a tie), else a new row."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [(room[r], r) for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits)[1]
        else:
            r = len(rows)
            rows.append([])
            room.append(seq_len)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def test_pack_from_arrays_matches_the_best_fit_rule():
    rng = np.random.default_rng(0)
    rows = [chat(i, turns=1 + i % 3) for i in range(60)]
    examples, _ = load_examples(rows, "messages")
    lengths = [len(e) for e in examples]
    packed = pack_examples(examples, 200)
    assert [[e.row for e in r] for r in packed] == [[examples[i].row for i in r] for r in _best_fit(lengths, 200)]
    assert [[e.input_ids for e in r] for r in packed[1:3]] == [[e.input_ids for e in r] for r in list(packed)[1:3]]
    for trial in range(3):  # many ties of room and length
        lengths = rng.integers(1, 9, size=50).tolist()
        fake = [ex(n, row=i) for i, n in enumerate(lengths)]
        got = [[id(e) for e in r] for r in pack_examples(fake, 12)]
        assert got == [[id(fake[i]) for i in r] for r in _best_fit(lengths, 12)]


def test_cache_is_reused_and_keyed_by_the_file_and_every_token_option(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i, turns=2) for i in range(40)])
    cache = tmp_path / "cache"
    first, r1 = load_examples(path, cache_dir=cache)
    assert r1.cache.startswith("rendered into") and "cache: rendered into" in str(r1)
    again, r2 = load_examples(path, cache_dir=cache)
    assert r2.cache == r1.cache.replace("rendered into", "read from")
    assert again == first and str(r2).split("; cache")[0] == str(r1).split("; cache")[0]
    assert capsys.readouterr().err.count("format auto -> messages") == 2  # said again when read from the cache
    entries = {p.name for p in cache.iterdir() if p.is_dir()}
    assert len(entries) == 1
    # Every option that changes the tokens is a new entry; the entry's files are arrays and JSON only.
    for options in ({"format": "messages"}, {"loss_on": "final_only"}, {"split_turns": False},
                    {"reasoning_effort": "high"}, {"max_seq_len": 60}, {"max_seq_len": 60, "truncation": "truncate"},
                    {"on_error": "skip"}):
        _, r = load_examples(path, cache_dir=cache, **options)
        assert r.cache.startswith("rendered into"), options
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 8
    for entry in entries:
        assert sorted(p.name for p in entry.iterdir()) == sorted(
            ["input_ids.npy", "loss_mask.npy", "offsets.npy", "rows.npy", "meta.json"])
        np.load(entry / "input_ids.npy", allow_pickle=False)
    # num_proc does not change the tokens, so it is not in the key.
    assert load_examples(path, cache_dir=cache, num_proc=2)[1].cache.startswith("read from")
    # A changed file (size and mtime) is rendered again; so is a copy at another path.
    write_jsonl(path, [chat(i, turns=2) for i in range(41)])
    changed, r = load_examples(path, cache_dir=cache)
    assert r.cache.startswith("rendered into") and len(changed) == len(first) + 2
    copy = write_jsonl(tmp_path / "copy.jsonl", [chat(i, turns=2) for i in range(41)])
    assert load_examples(copy, cache_dir=cache)[1].cache.startswith("rendered into")


def test_a_failed_render_caches_nothing_and_a_bad_entry_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0), "{not json", chat(1)])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_examples(path, "messages", cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    examples, report = load_examples(path, "messages", on_error="skip", cache_dir=cache)
    assert [e.row for e in examples] == [0, 2] and dict(report.skipped) == {"invalid JSON": 1}
    assert load_examples(path, "messages", on_error="skip", cache_dir=cache)[1].skipped == report.skipped
    entry = Path(report.cache.split(" ", 2)[2])
    np.save(entry / "offsets.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match="delete it to render again"):
        load_examples(path, "messages", on_error="skip", cache_dir=cache)


CONCURRENT_LOAD = """
import sys, numpy as np
from data import load_examples
examples, report = load_examples(sys.argv[1], "messages", cache_dir=sys.argv[2], num_proc=1)
print(report.cache.split(" /")[0], int(np.asarray(examples.arrays["input_ids"], np.int64).sum()), len(examples))
"""


def test_concurrent_loads_render_once_and_read_the_same_arrays(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i, turns=3) for i in range(3000)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(path), str(tmp_path / "cache")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    said = sorted(out.split()[0] + " " + out.split()[1] for out, _ in outs)
    assert said == ["read from", "read from", "rendered into"]
    assert len({tuple(out.split()[2:]) for out, _ in outs}) == 1
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_hub_style_dataset_is_read_in_batches_like_rows():
    datasets = pytest.importorskip("datasets")
    rows = [chat(i, turns=2) for i in range(1200)]
    ds = datasets.Dataset.from_list([{"messages": json.dumps(r["messages"])} for r in rows])
    got, report = load_examples(ds, "messages")
    want, _ = load_examples(rows, "messages")
    assert report.rows == 1200 and got == want


def test_hub_dataset_renders_once_into_the_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from test_recipes import save_in_hub_cache

    rows = [chat(i, turns=2) for i in range(700)]
    save_in_hub_cache(tmp_path / "hub", "someone/chats", "default",
                      {"train": [{"messages": json.dumps(r["messages"])} for r in rows]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hub")
    first, report = load_examples("someone/chats", "messages", cache_dir=tmp_path / "cache")
    assert report.source == "someone/chats[train]" and report.rows == 700
    assert report.cache.startswith("rendered into") and first == load_examples(rows, "messages")[0]
    again, report = load_examples("someone/chats", "messages", cache_dir=tmp_path / "cache")
    assert report.cache.startswith("read from") and again == first


def test_an_unwritable_cache_is_one_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0)])
    with pytest.raises(DataError, match="cannot write the rendered-data cache in .*data.cache: false"):
        load_examples(path, cache_dir=path / "cache")  # under a file: no folder can be made there


def test_rows_are_drawn_only_a_few_chunks_ahead_of_the_results():
    from data.pipeline import _ordered_map

    drawn = []

    def jobs():
        for i in range(100):
            drawn.append(i)
            yield -i

    results = _ordered_map(abs, jobs(), 2)
    assert next(results) == 0 and len(drawn) <= 2 * 2 + 1  # not the whole stream
    assert list(results) == list(range(1, 100))


@pytest.mark.slow
def test_peak_memory_grows_by_less_than_10_bytes_a_token(tmp_path):
    """The trainer's data path (benchmarks/bench_data_scale.py) at 10^4 and 10^5 generated rows, each
    load in a fresh process: peak RSS grows by well under 10 bytes per token, first load and cached."""
    from benchmarks import bench_data_scale

    out = bench_data_scale.main(["--rows", "10000", "100000", "--dir", str(tmp_path)])
    slope = out["slopes"][0]
    assert slope["first_bytes_per_token"] < 10 and slope["cached_bytes_per_token"] < 10, slope
    big = out["results"][-1]
    assert big["cached"]["load_and_pack_s"] < big["first"]["load_and_pack_s"] / 10
