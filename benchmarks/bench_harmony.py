"""Render + tokenize throughput: gptoss-ft's renderer against openai-harmony on the same conversations.

    python -m benchmarks.bench_harmony [--rows 2000] [--num-proc 2]

Both sides produce the same training examples (one per assistant turn, earlier turns' analysis
dropped; the tests check they are token-identical). openai-harmony is timed on ready-built
`Conversation` objects, one `render_conversation_for_training` call per example, so its row parsing
is not counted; gptoss-ft is timed from JSON rows (`load_examples`), parsing included.

Large datasets: `load_examples(..., num_proc=N)` renders contiguous chunks of rows in N worker
processes (order kept; default every core) into flat arrays, kept with `cache_dir=`;
`benchmarks/bench_data_scale.py` measures that path at 10^4 to 10^6 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if _VOCAB.is_dir():  # offline runs, as in tests
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))

WORDS = "the of weather Paris café 日本語 🎉 tool call result because therefore <|end|> 42 3.14 json".split()
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"}},
           "required": ["city"]}


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n // 2, n)))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Harmony-format rows (`Conversation.to_json()` form): tools, 1-4 turns, tool calls, reasoning."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "developer", "content": [{"type": "developer_content", "instructions": _text(rng, 20),
                 "tools": {"functions": {"name": "functions", "tools": [
                     {"name": "get_weather", "description": "Current weather.", "parameters": WEATHER}]}}}]}]
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": [{"type": "text", "text": _text(rng, 40)}]})
            msgs.append({"role": "assistant", "channel": "analysis", "content": [{"type": "text", "text": _text(rng, 120)}]})
            if rng.random() < 0.5:
                msgs.append({"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather",
                             "content_type": "<|constrain|>json", "content": [{"type": "text", "text": '{"city": "Paris"}'}]})
                msgs.append({"role": "tool", "name": "functions.get_weather", "channel": "commentary",
                             "recipient": "assistant", "content": [{"type": "text", "text": _text(rng, 30)}]})
            msgs.append({"role": "assistant", "channel": "final", "content": [{"type": "text", "text": _text(rng, 80)}]})
        rows.append({"messages": msgs})
    return rows


def harmony_examples(rows: list[dict]):
    """The oracle's inputs: one `Conversation` per example, built outside the timed region."""
    from openai_harmony import Conversation, Message, Role, SystemContent

    convs = []
    for row in rows:
        msgs = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new())]
        msgs += [Message.from_dict(m) for m in row["messages"]]
        ends = [i for i, m in enumerate(msgs) if m.channel == "final"]
        for t, end in enumerate(ends):
            prev = ends[t - 1] if t else -1
            keep = [m for i, m in enumerate(msgs[: end + 1]) if not (i <= prev and m.channel == "analysis")]
            convs.append(Conversation.from_messages(keep))
    return convs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args(argv)

    from openai_harmony import HarmonyEncodingName, RenderConversationConfig, load_harmony_encoding

    from data import get_tokenizer, load_examples

    rows = json.loads(json.dumps(make_rows(args.rows)))
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    config = RenderConversationConfig(auto_drop_analysis=False)
    convs = harmony_examples(rows)
    get_tokenizer()

    t = time.perf_counter()
    theirs = [enc.render_conversation_for_training(c, config) for c in convs]
    t_harmony = time.perf_counter() - t

    t = time.perf_counter()
    ours, _ = load_examples(rows, "harmony")
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    ours_mp, _ = load_examples(rows, "harmony", num_proc=args.num_proc)
    t_mp = time.perf_counter() - t

    assert [e.input_ids for e in ours] == theirs == [e.input_ids for e in ours_mp], "renders differ"
    tokens = sum(map(len, theirs))
    print(f"{args.rows} rows, {len(theirs)} examples, {tokens} tokens (identical on both sides)")
    for name, secs in (("openai-harmony", t_harmony), ("gptoss-ft", t_ours), (f"gptoss-ft num_proc={args.num_proc}", t_mp)):
        print(f"{name:28s} {secs:7.3f} s  {len(theirs) / secs:9.0f} examples/s  {tokens / secs / 1e6:6.2f} M tokens/s"
              f"  {t_harmony / secs:5.2f}x")
    return {"rows": args.rows, "examples": len(theirs), "tokens": tokens, "openai_harmony_s": t_harmony,
            "ours_s": t_ours, "ours_num_proc_s": t_mp, "num_proc": args.num_proc,
            "speedup": t_harmony / t_ours, "speedup_num_proc": t_harmony / t_mp}


if __name__ == "__main__":
    main()
