"""Data at scale: N generated rows from a JSONL file to packed training batches, first and cached.

    python -m benchmarks.bench_data_scale [--rows 10000 100000 1000000] [--seq-len 2048] [--json OUT]

For each N, a seeded JSONL file of N conversations is written (`make_row`: a mix of row shapes read
by the `messages`/`openai` converter: single- and multi-turn chats, reasoning in `thinking`, OpenAI
tool calls with a `tools` column and tool results, system prompts, per-row `reasoning_effort`,
content as lists of text parts). Then the trainer's own data path runs twice, each time in a fresh
process so that its memory is its own: `finetune.objectives.SFT.load` (load_examples with
data.cache on, rendering on every core, then packing to seq_len) and the first `--batches`
micro-batches of `finetune.trainer.Batches`, collated. The first run renders into an empty cache;
the second (a second or resumed run, or another process of a multi-process run) reads it.

Measured in each child: seconds to load, pack and build the batches; rows/s of the load; the
process's RSS before loading (after imports and the tokenizer) and its peak (VmHWM) after the
batches; the peak RSS of its largest rendering worker (RUSAGE_CHILDREN; bounded by a few chunks of
rows, whatever N). Growth per token is (peak - before) / tokens for each N, and the slope
(peak(N2) - peak(N1)) / (tokens(N2) - tokens(N1)) between sizes, which cancels fixed costs.
Generating the file is not timed. The cache and the files live in a temporary folder (--dir to keep).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if _VOCAB.is_dir():  # offline runs, as in tests
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))

WORDS = ("the of a to and in is it that for on with as was weather Paris café 日本語 🎉 tool call result because "
         "therefore 42 3.14 json answer question step first then check value sum total city temperature").split()
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(n // 2, n)))


def make_row(rng: random.Random) -> dict:
    """One conversation; its shape drawn from the mix in the module docstring."""
    kind = rng.random()
    msgs: list[dict] = []
    row: dict = {"messages": msgs}
    if kind < 0.3:  # single turn, no reasoning
        msgs += [{"role": "user", "content": _text(rng, 30)}, {"role": "assistant", "content": _text(rng, 60)}]
    elif kind < 0.6:  # multi-turn with reasoning
        for _ in range(rng.randint(2, 4)):
            msgs += [{"role": "user", "content": _text(rng, 25)},
                     {"role": "assistant", "thinking": _text(rng, 50), "content": _text(rng, 40)}]
    elif kind < 0.85:  # tools: call, result, answer (OpenAI chat-completions shape)
        row["tools"] = TOOLS
        msgs.append({"role": "user", "content": _text(rng, 20)})
        for t in range(rng.randint(1, 2)):
            call_id = f"call_{t}"
            msgs += [{"role": "assistant", "content": _text(rng, 15), "tool_calls": [
                        {"id": call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": _text(rng, 2)})}}]},
                     {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temp": rng.randint(-5, 35)})}]
        msgs.append({"role": "assistant", "thinking": _text(rng, 30), "content": _text(rng, 40)})
    else:  # system prompt, effort column, content as text parts
        row["reasoning_effort"] = rng.choice(["low", "medium", "high"])
        msgs += [{"role": "system", "content": _text(rng, 15)},
                 {"role": "user", "content": [{"type": "text", "text": _text(rng, 30)}]},
                 {"role": "assistant", "thinking": _text(rng, 40), "content": [{"type": "text", "text": _text(rng, 50)}]}]
    return row


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(make_row(rng), ensure_ascii=False) + "\n")


def child(file: str, cache_dir: str, seq_len: int, n_batches: int, out: str) -> None:
    """One run of the trainer's data path, measured (see the module docstring)."""
    from benchmarks.measure import reset_peak, status
    from data import get_tokenizer
    from finetune import config as cfglib
    from finetune.objectives import SFT
    from finetune.trainer import Batches

    get_tokenizer()
    cfg = cfglib.from_dict({"model": {"path": "unused"}, "output_dir": str(Path(cache_dir).parent / "run"),
                            "data": {"train": file, "max_seq_len": seq_len, "cache_dir": cache_dir},
                            "train": {"batch_size": 8, "max_steps": 1}}, check_paths=False)
    before, anon_before = status("VmRSS:"), status("RssAnon:")
    reset_peak()
    t0 = time.perf_counter()
    data = SFT(cfg, None).load(cfg)
    t_load = time.perf_counter() - t0
    peak_load = status("VmHWM:")
    t = cfg.train
    batches = Batches(data.train_rows, batch_size=t.batch_size, grad_accum=t.grad_accum, world=1, rank=0, seed=t.seed)
    tokens_in_batches = 0
    from data import collate

    for step in range(n_batches):
        for micro in batches.for_step(step):
            tokens_in_batches += int(collate(micro)["num_tokens"])
    t_total = time.perf_counter() - t0
    rows = data.train_rows
    examples = rows.examples
    peak = status("VmHWM:")
    # RSS counts the page-cache pages of the mapped arrays that batches touched (and the kernel's
    # fault-around neighbours): clean, shared and reclaimable, unlike the process's own (anonymous) memory.
    result = {"load_and_pack_s": t_load, "total_s": t_total, "rss_before": before, "peak_rss": peak,
              "peak_rss_load_and_pack": peak_load,
              "rss_anon_before": anon_before, "rss_anon_end": status("RssAnon:"), "rss_file_end": status("RssFile:"),
              "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
              "examples": len(examples), "tokens": int(examples.lengths().sum()), "packed_rows": len(rows),
              "batch_tokens": tokens_in_batches, "report": data.report}
    Path(out).write_text(json.dumps(result))


def _run_child(file: Path, cache: Path, seq_len: int, n_batches: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.bench_data_scale", "--child", str(file), str(cache), str(seq_len),
               str(n_batches), f.name]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=10, help="optimizer steps of micro-batches to collate")
    ap.add_argument("--dir", default=None, help="keep the generated files and caches here")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=5, metavar=("FILE", "CACHE", "SEQ_LEN", "BATCHES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        file, cache, seq_len, n_batches, out = args.child
        child(file, cache, int(seq_len), int(n_batches), out)
        return {}
    keep = args.dir is not None
    work = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in args.rows:
            file = work / f"rows-{n}.jsonl"
            if not file.exists():
                t = time.perf_counter()
                write_rows(file, n)
                print(f"wrote {n} rows to {file} ({file.stat().st_size / 2**20:.0f} MiB, "
                      f"{time.perf_counter() - t:.0f} s)", flush=True)
            cache = work / f"cache-{n}"
            first = _run_child(file, cache, args.seq_len, args.batches)
            again = _run_child(file, cache, args.seq_len, args.batches)
            r = {"rows": n, "file_bytes": file.stat().st_size, "tokens": first["tokens"],
                 "examples": first["examples"], "packed_rows": first["packed_rows"], "first": first, "cached": again,
                 "rows_per_s_first": n / first["load_and_pack_s"], "rows_per_s_cached": n / again["load_and_pack_s"],
                 "growth_bytes_per_token_first": (first["peak_rss"] - first["rss_before"]) / first["tokens"],
                 "growth_bytes_per_token_cached": (again["peak_rss"] - again["rss_before"]) / again["tokens"]}
            assert again["tokens"] == first["tokens"] and again["batch_tokens"] == first["batch_tokens"]
            results.append(r)
            print(f"{n} rows, {r['tokens']} tokens ({r['examples']} examples, {r['packed_rows']} packed rows): "
                  f"first {first['load_and_pack_s']:.1f} s ({r['rows_per_s_first']:.0f} rows/s), peak RSS "
                  f"{first['peak_rss'] / 2**20:.0f} MiB (+{r['growth_bytes_per_token_first']:.2f} B/token), "
                  f"worker peak {first['worker_peak_rss'] / 2**20:.0f} MiB; cached {again['load_and_pack_s']:.1f} s, "
                  f"peak RSS {again['peak_rss'] / 2**20:.0f} MiB (+{r['growth_bytes_per_token_cached']:.2f} B/token)",
                  flush=True)
            if not keep:
                file.unlink()
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    slopes = [{"from_rows": a["rows"], "to_rows": b["rows"],
               **{f"{k}_bytes_per_token": (b[k]["peak_rss"] - a[k]["peak_rss"]) / (b["tokens"] - a["tokens"])
                  for k in ("first", "cached")}}
              for a, b in zip(results, results[1:])]
    for s in slopes:
        print(f"growth {s['from_rows']} -> {s['to_rows']} rows: first load {s['first_bytes_per_token']:.2f} B/token, "
              f"cached {s['cached_bytes_per_token']:.2f} B/token")
    out = {"seq_len": args.seq_len, "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
           "results": results, "slopes": slopes}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
