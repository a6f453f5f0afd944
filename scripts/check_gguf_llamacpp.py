"""Load a GGUF export in llama.cpp itself and compare it with our model (kept out of the test run:
it needs a llama.cpp build).

    python scripts/check_gguf_llamacpp.py [--source CKPT_OR_RUN] [--tokens 16] [--seed 0]

Without --source it exports a random tiny gpt-oss (`gptoss-ft init`) to GGUF. On Harmony chat
prompts (longer than the tiny model's sliding window) it compares, position by position, the logits
llama.cpp computes with our model's (fp32), and the greedy continuations token by token. It also
checks that llama.cpp tokenizes text (special tokens included) as o200k_harmony does. Exits 1 on a
disagreement: logits off by more than 2% of their scale, or greedy tokens that differ where our
top-2 gap is larger than the measured logit error (a smaller gap is a near-tie, reported as such).

llama.cpp comes from `llama-cpp-python`'s source package on PyPI, compiled once (minutes on 2 cores)
into a cached wheel:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \\
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" \\
      pip wheel --no-deps --no-binary llama-cpp-python llama-cpp-python -w ~/.cache/gptoss-ft/wheels
    pip install --no-index --find-links ~/.cache/gptoss-ft/wheels llama-cpp-python
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_VOCAB = ROOT.parent / "shared" / "vocab"
if _VOCAB.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about rivers."}],
]
TEXTS = ["Hello, world! Numbers 12345 and émigré café 🚀.", "<|start|>user<|message|>hi<|end|><|start|>assistant",
         "  indented\n\ttabs\r\nand 'quotes' don't"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="checkpoint or run directory (default: a random tiny model)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; see this script's docstring for the cached build", file=sys.stderr)
        return 2

    import model as modellib
    from data.tokenizer import get_tokenizer
    from finetune.generate import chat_prompt, generate
    from finetune.gguf import export_gguf
    from model.checkpoint import write_random
    from model.config import preset

    work = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    source = Path(args.source) if args.source else write_random(work / "tiny", preset("tiny"), seed=args.seed)
    report = export_gguf(source, work / "model.gguf", requant="nearest")
    print(f"llama-cpp-python {llama_cpp.__version__}; exported {report.path} ({report.path.stat().st_size} bytes)")

    ours = modellib.from_pretrained(_merged_source(source, work), dtype=torch.float32, experts="mxfp4").eval()
    llm = llama_cpp.Llama(str(report.path), n_ctx=512, n_batch=512, logits_all=True, n_threads=args.threads,
                          verbose=False, seed=args.seed)
    enc = get_tokenizer()
    ok = True
    for text in TEXTS:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        mine = enc.encode(text, allowed_special="all")
        ok &= _report(f"tokenize {text[:24]!r}", theirs == mine, f"{theirs} vs {mine}")

    worst, agree, total = 0.0, 0, 0
    for messages in PROMPTS:
        prompt = chat_prompt(messages)
        with torch.no_grad():
            ref = ours(torch.tensor([prompt])).logits[0].float()  # [T, V]
        llm.reset()
        llm.eval(prompt)
        got = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
        rel = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()  # per position, vs the logit scale
        err = (got - ref).abs().max().item()
        worst = max(worst, rel)
        mine = generate(ours, prompt, max_new_tokens=args.tokens, stop_ids=())
        theirs, ctx = [], list(prompt)
        for _ in range(args.tokens):
            tok = int(torch.tensor(llm.scores[len(ctx) - 1]).argmax())
            theirs.append(tok)
            ctx.append(tok)
            llm.eval([tok])
        # Greedy agreement up to the first divergence; a divergence passes only as a near-tie: our
        # top-2 gap there is within the logit error measured above (random tiny models have many).
        n = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        agree, total = agree + n, total + len(mine)
        verdict = f"greedy agreement {n}/{len(mine)}"
        passed = rel < 2e-2
        if n < len(mine):
            with torch.no_grad():
                step = ours(torch.tensor([prompt + mine[:n]])).logits[0, -1].float()
            gap = float(step[mine[n]] - step[theirs[n]])
            tie = gap <= 2 * err
            verdict += f", then a {'near-tie' if tie else 'real disagreement'} (our gap {gap:.4f}, logit error {err:.4f})"
            passed &= tie
        ok &= _report(f"prompt of {len(prompt)} tokens", passed,
                      f"max rel logit error {rel:.2e}, {verdict}\n    ours  {mine}\n    llama {theirs}")
    print(f"overall: greedy tokens agree {agree}/{total}; max relative logit error {worst:.2e}")
    return 0 if ok else 1


def _merged_source(source: Path, work: Path) -> Path:
    """What our model loads: the checkpoint itself, or a run's merged MXFP4 export."""
    from finetune.run import RunDir

    if RunDir.is_run(source):
        from finetune.export import export

        return export(source, "mxfp4", work / "merged", requant="nearest").path
    return source


def _report(what: str, passed: bool, detail: str) -> bool:
    print(f"{'ok  ' if passed else 'FAIL'} {what}: {detail}")
    return passed


if __name__ == "__main__":
    sys.exit(main())
