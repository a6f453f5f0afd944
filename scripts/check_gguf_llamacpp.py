"""Load a GGUF export in llama.cpp itself and compare it with gptoss-ft (kept out of the test run: it
needs llama-cpp-python, a build of llama.cpp; README "Checking a GGUF in llama.cpp" explains the figures).

    python scripts/check_gguf_llamacpp.py [--source RUN_OR_CHECKPOINT] [--base PATH] [--tokens 16] [--seed 0]

1. The file. Without --source: a random tiny gpt-oss and a random LoRA adapter on attention and
   experts, written as a run, exported as `gptoss-ft export RUN --format gguf` does by default (the
   experts the adapter changed requantized by GPTQ on the run's training rows). The reference is
   the same merged model as an MXFP4 checkpoint (`--format mxfp4`, also GPTQ), run by gptoss-ft in fp32.
2. Tokenizer: llama.cpp's tokens of texts in many scripts against o200k_harmony's. Harmony's special
   tokens must come out identical. Elsewhere llama.cpp's pre-tokenizer cuts some texts where
   o200k's does not (before combining marks: Hindi, Bengali, Tamil, Thai vowel signs); such a text
   counts as explained when llama.cpp's tokens are exactly o200k's encodings of the pieces it cut
   and every extra cut is at a combining mark. That is llama.cpp's behaviour, not the file's.
3. Chat template: the file's template is gptoss-ft's, and rendered by llama-cpp-python's own Jinja
   formatter and tokenized by llama.cpp it gives the tokens gptoss-ft prompts with, for
   conversations with tools, instructions, a tool call and its result, at each reasoning effort.
4. Logits and greedy tokens on Harmony prompts longer than the tiny model's sliding window: the
   relative logit error per position (max |llama.cpp - ours| / max |ours|), and greedy
   continuations token by token. A position off by more than --tol is explained when our router
   was at a near-tie there (4th and 5th expert logits within --tie of the logit range in some
   layer: rounding can flip the choice, which moves that token a lot); a greedy divergence is
   explained as a logit near-tie (our top-2 gap within twice the logit error measured at positions
   without router near-ties) or a router near-tie at that step.

Exit status: 0 all agree or every disagreement is explained; 1 something unexplained; 2
llama-cpp-python is not installed. Files are written in a temporary directory removed at the end.

llama.cpp comes from `llama-cpp-python`'s source package on PyPI, compiled once (25 minutes on 2
cores) into a cached wheel:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \\
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" \\
      pip wheel --no-deps --no-binary llama-cpp-python llama-cpp-python -w ~/.cache/gptoss-ft/wheels
    pip install --find-links ~/.cache/gptoss-ft/wheels llama-cpp-python
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_VOCAB = ROOT.parent / "shared" / "vocab"
if _VOCAB.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))

TEXTS = [
    "Hello, world! Numbers 12345, 3.14159 and 1,000,000.",
    "  indented\n\ttabs\r\nand 'quotes' don't won't I'm you're THEY'LL",
    "émigré café naïve façade — «guillemets» Ünïcödé ΑΒΓ",
    "decomposed e\u0301 and a\u0308 (NFD)",
    "日本語のテキストです。中文文本，标点！한국어 텍스트입니다.",
    "مرحبا بالعالم — שלום עולם",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "আমি বাংলায় গান গাই",
    "வணக்கம் உலகம்",
    "สวัสดีชาวโลก",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "🚀 👩‍💻 👍🏽 🇫🇷 emoji",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))",
    '{"key": [1, 2, {"nested": null}], "ok": true}',
    "https://example.com/a?b=c&d=e /usr/local/bin C:\\Windows\\System32",
    "∑_{i=1}^{n} i² = n(n+1)/2, α≤β, x₁",
    "a  b   c\n\n\n d\u00a0e",
    "HTTPServerError getXMLHttpRequest snake_case_name",
]
SPECIAL_TEXTS = [
    "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>",
    "<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{}<|call|><|endoftext|>",
]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about rivers."}],
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "array", "items": {"type": "integer"}}}, "required": ["city"]}}}
TEMPLATE_CASES = [  # (messages, tools)
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL]),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "thinking": "Use the tool.",
       "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
      {"role": "tool", "content": "18C, sunny"}], [WEATHER_TOOL]),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "greet", "content": "Hello!"},
      {"role": "user", "content": "Bye"}], []),
]


# -- judging (pure Python; tests/test_check_gguf_llamacpp.py) --------------------------------------

def pre_tokenizer_split(text: str, theirs: list[int], enc) -> list[str] | None:
    """How llama.cpp's tokens of `text` differ from o200k's, when the difference is only where the
    text was cut before BPE: the pieces (in order) such that each piece's o200k encoding is exactly
    llama.cpp's tokens for it, and every cut that o200k's pre-tokenizer does not make is next to a
    combining mark. None when no such pieces exist (then the tokens themselves disagree)."""
    import regex

    token_bytes = [enc.decode_single_token_bytes(t) for t in theirs]
    data = text.encode()
    if b"".join(token_bytes) != data:
        return None
    offsets = [0]
    for b in token_bytes:
        offsets.append(offsets[-1] + len(b))
    chunk_ends = {len(m.group(0).encode()) + len(text[: m.start()].encode()) for m in regex.finditer(enc._pat_str, text)}
    back: dict[int, int] = {0: -1}  # token index j reachable as a cut -> the cut before its piece
    for j in range(1, len(theirs) + 1):
        for i in sorted(back, reverse=True):
            try:
                piece = data[offsets[i]:offsets[j]].decode()
            except UnicodeDecodeError:
                continue
            if enc.encode_ordinary(piece) == theirs[i:j] and (i == 0 or offsets[i] in chunk_ends
                                                                or _at_combining_mark(data, offsets[i])):
                back[j] = i
                break
    if len(theirs) not in back:
        return None
    pieces, j = [], len(theirs)
    while j > 0:
        i = back[j]
        pieces.append(data[offsets[i]:offsets[j]].decode())
        j = i
    return pieces[::-1]


def _at_combining_mark(data: bytes, offset: int) -> bool:
    """The character starting at byte `offset`, or the one before it, is a combining mark (M*)."""
    after = data[offset:].decode(errors="ignore")[:1]
    before = data[:offset].decode(errors="ignore")[-1:]
    return any(c and unicodedata.category(c).startswith("M") for c in (after, before))


def router_near_ties(router_logits: list[torch.Tensor], top_k: int, tie: float) -> torch.Tensor:
    """[T] bool: a position where, in some layer, the last expert chosen and the first left out have
    logits within `tie` of that token's logit range (a rounding difference can swap them)."""
    near = None
    for logits in router_logits:  # [T, E] per layer
        s = logits.float().sort(-1, descending=True).values
        margin = (s[:, top_k - 1] - s[:, top_k]) / (s[:, 0] - s[:, -1]).clamp(min=1e-12)
        near = margin < tie if near is None else near | (margin < tie)
    return near


@dataclass
class PositionVerdict:
    worst_clean: float
    """The largest relative logit error at positions without a router near-tie."""
    explained: list[int]
    """Positions over the tolerance at a router near-tie."""
    unexplained: list[int]


def judge_positions(rel_error: torch.Tensor, near_tie: torch.Tensor, tol: float) -> PositionVerdict:
    """Per-position relative logit errors [T] of one sequence, judged with its router near-ties [T]."""
    over = rel_error > tol
    clean = rel_error[~near_tie]
    return PositionVerdict(float(clean.max()) if clean.numel() else 0.0,
                           [int(t) for t in torch.nonzero(over & near_tie).flatten()],
                           [int(t) for t in torch.nonzero(over & ~near_tie).flatten()])


def judge_divergence(gap: float, logit_error: float, router_tie: bool) -> str | None:
    """Why greedy decoding may pick another token: "logit near-tie" (our top-2 gap within twice the
    logit error), "router near-tie", or None (a real disagreement)."""
    if gap <= 2 * logit_error:
        return "logit near-tie"
    if router_tie:
        return "router near-tie"
    return None


# -- the check ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="run or checkpoint directory (default: a random tiny run)")
    ap.add_argument("--base", default=None, help="the run's base, when not where the run recorded it")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=2e-2, help="relative logit error a position may have")
    ap.add_argument("--tie", type=float, default=1e-2, help="router near-tie: 4th-5th margin / logit range")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; see this script's docstring for the cached build", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        return _check(args, llama_cpp, Path(tmp))


def _check(args, llama_cpp, work: Path) -> int:
    import model as modellib
    from finetune.export import export
    from finetune.gguf import HARMONY_JINJA
    from finetune.run import RunDir

    source = Path(args.source) if args.source else _random_run(work / "run", args.seed)
    gguf_path, reference = work / "model.gguf", source
    report = export(source, "gguf", gguf_path, base=args.base)  # the CLI's defaults: GPTQ for changed experts
    if RunDir.is_run(source):
        reference = export(source, "mxfp4", work / "merged", base=args.base).path
    print(f"llama-cpp-python {llama_cpp.__version__}; {gguf_path.name}: {gguf_path.stat().st_size} bytes, "
          f"{report.experts_copied} expert projections copied, {report.experts_requantized} requantized (gptq)")
    ours = modellib.from_pretrained(reference, dtype=torch.float32, experts="mxfp4").eval()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_batch=512, logits_all=True, n_threads=args.threads,
                          verbose=False, seed=args.seed)
    try:
        ok = _tokenizer(llm)
        ok &= _template(llm, HARMONY_JINJA)
        ok &= _logits(llm, ours, args)
    finally:
        llm.close()
    print("result: " + ("agree (every disagreement explained)" if ok else "DISAGREE (see FAIL lines)"))
    return 0 if ok else 1


def _random_run(run: Path, seed: int) -> Path:
    """A tiny random base and a random LoRA adapter on attention and experts, recorded as a run."""
    import model as modellib
    from finetune import config as cfglib
    from finetune.run import RunDir, save_adapter
    from model.checkpoint import write_random
    from model.config import preset

    base = write_random(run.parent / "base", preset("tiny"), seed=seed)
    m = modellib.from_pretrained(base, dtype=torch.float32, experts="mxfp4")
    torch.manual_seed(seed)  # lora_A's init draws from the global generator
    modellib.add_lora(m, r=4, alpha=8, targets=("attention", "experts"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rd = RunDir(run)
    rd.start(cfglib.from_dict({"model": {"path": str(base)}, "output_dir": str(run),
                               "data": {"train": str(ROOT / "recipes" / "data" / "quickstart_train.jsonl"),
                                        "format": "messages", "max_seq_len": 256},
                               "lora": {"r": 4, "alpha": 8, "targets": ["attention", "experts"]}}))
    save_adapter(m, rd.adapter, base_model=str(base))
    return run


def _tokenizer(llm) -> bool:
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    ok, same, split = True, 0, []
    for text in SPECIAL_TEXTS:
        theirs, mine = llm.tokenize(text.encode(), add_bos=False, special=True), enc.encode(text, allowed_special="all")
        ok &= _report(f"special tokens in {text[:30]!r}", theirs == mine, f"{len(mine)} tokens" if theirs == mine
                      else f"llama.cpp {theirs} vs o200k_harmony {mine}")
    for text in TEXTS:
        theirs, mine = llm.tokenize(text.encode(), add_bos=False, special=True), enc.encode_ordinary(text)
        if theirs == mine:
            same += 1
            continue
        pieces = pre_tokenizer_split(text, theirs, enc)
        if pieces is None:
            ok &= _report(f"tokens of {text[:30]!r}", False, f"llama.cpp {theirs} vs o200k_harmony {mine}")
        else:
            split.append(f"{text[:24]!r}: {len(theirs)} vs {len(mine)} tokens, cut as {pieces[:6]}"
                         + (" ..." if len(pieces) > 6 else ""))
    print(f"ok   tokenizer: {same}/{len(TEXTS)} texts tokenized identically; {len(split)} differ only where "
          "llama.cpp's pre-tokenizer cuts at combining marks (llama.cpp's behaviour, not the file's):")
    for line in split:
        print(f"       {line}")
    return ok


def _template(llm, harmony_jinja: str) -> bool:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from data.formats import prompt_conversation
    from data.harmony import render_for_completion

    template = llm.metadata.get("tokenizer.chat_template")
    ok = _report("chat template in the file", template == harmony_jinja, "gptoss-ft's Harmony template"
                 if template == harmony_jinja else "not gptoss-ft's template")
    formatter = Jinja2ChatFormatter(template or "", eos_token="<|return|>", bos_token="<|startoftext|>")
    agree = 0
    for messages, tools in TEMPLATE_CASES:
        for effort in ("low", "medium", "high"):
            text = formatter(messages=messages, tools=tools or None, reasoning_effort=effort).prompt
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            mine = render_for_completion(prompt_conversation({"prompt": messages, "tools": tools}), reasoning_effort=effort)
            agree += theirs == mine
            if theirs != mine:
                ok &= _report(f"template on {messages[-1]['content'][:24]!r} ({effort})", False,
                              f"llama.cpp {len(theirs)} tokens vs gptoss-ft {len(mine)}")
    n = len(TEMPLATE_CASES) * 3
    ok &= _report("chat template rendered by llama-cpp-python, tokenized by llama.cpp", agree == n,
                  f"{agree}/{n} conversations (tools, instructions, a call and its result; 3 efforts) give "
                  "gptoss-ft's prompt tokens")
    return ok


def _logits(llm, ours, args) -> bool:
    from finetune.generate import chat_prompt, generate

    top_k = ours.config.num_experts_per_tok
    routers = [layer.mlp.router for layer in ours.model.layers]

    def forward(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Our logits [T, V] and router near-ties [T]."""
        seen = []
        hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append(out.detach())) for r in routers]
        try:
            with torch.no_grad():
                logits = ours(torch.tensor([ids])).logits[0].float()
        finally:
            for h in hooks:
                h.remove()
        return logits, router_near_ties(seen, top_k, args.tie)

    ok, agree, total, worst, ties = True, 0, 0, 0.0, 0
    for messages in PROMPTS:
        prompt = chat_prompt(messages)
        ref, near = forward(prompt)
        llm.reset()
        llm.eval(prompt)
        got = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
        rel = (got - ref).abs().amax(-1) / ref.abs().amax(-1)
        v = judge_positions(rel, near, args.tol)
        worst, ties = max(worst, v.worst_clean), ties + int(near.sum())
        clean_err = float((got - ref).abs()[~near].max()) if (~near).any() else 0.0
        mine = generate(ours, prompt, max_new_tokens=args.tokens, stop_ids=())
        theirs, ctx = [], list(prompt)
        for _ in range(args.tokens):
            tok = int(torch.tensor(llm.scores[len(ctx) - 1]).argmax())
            theirs.append(tok)
            ctx.append(tok)
            llm.eval([tok])
        n = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        agree, total = agree + n, total + len(mine)
        verdict = f"greedy agreement {n}/{len(mine)}"
        passed = not v.unexplained
        if n < len(mine):
            step, step_near = forward(prompt + mine[: n + 1])
            gap = float(step[len(prompt) + n - 1, mine[n]] - step[len(prompt) + n - 1, theirs[n]])
            why = judge_divergence(gap, clean_err, bool(step_near[len(prompt) + n - 1]))
            verdict += f", then {why or 'a real disagreement'} (our top-2 gap {gap:.4f}, logit error {clean_err:.4f})"
            passed &= why is not None
        ok &= _report(f"prompt of {len(prompt)} tokens", passed,
                      f"max rel logit error {v.worst_clean:.2e} where no router near-tie; {len(v.explained)} positions "
                      f"over {args.tol:g} at router near-ties, {len(v.unexplained)} unexplained "
                      f"{v.unexplained[:8]}; {verdict}\n    ours  {mine}\n    llama {theirs}")
    print(f"overall: greedy tokens agree {agree}/{total}; max relative logit error {worst:.2e} at positions "
          f"without router near-ties ({ties} near-tie positions)")
    return ok


def _report(what: str, passed: bool, detail: str) -> bool:
    print(f"{'ok  ' if passed else 'FAIL'} {what}: {detail}")
    return passed


if __name__ == "__main__":
    sys.exit(main())
