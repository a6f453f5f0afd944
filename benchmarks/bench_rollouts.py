"""GRPO rollout generation with a LoRA adapter: ours (`finetune.generate.generate_batch`, the batched
KV-cache sampler GRPO uses) against transformers' `generate` on `GptOssForCausalLM` + PEFT, on the
same checkpoint, adapter and prompt.

    python -m benchmarks.bench_rollouts [--quick] [--generations G] [--new-tokens N] [--json PATH]

The model is bench_train_step's (gpt-oss-20b's vocabulary 201088, 32 experts top-4, head size 64, at
hidden 512 and 4 layers; --quick: 2 layers). The adapter: r=16, alpha=32 on attention and experts,
with random nonzero lora_B (an adapter mid-training), written PEFT-style by `finetune.run.save_adapter`.
The prompt is a real Harmony prompt (`data.render_prompt`, ending with `<|start|>assistant`); one
GRPO group is G = 8 copies of it (grpo.num_generations' default), each sampled for N new tokens
(N = 128; --quick 32) at temperature 1, top_p 1. fp32 on CPU.

- ours: `model.from_pretrained(experts="mxfp4")` + `finetune.run.attach_adapter` (experts stay MXFP4,
  expert LoRA as x A_e B_e), eval mode, `generate_batch(model, [prompt] * G, max_new_tokens=N,
  temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))`: one forward over the
  prompt, then one per token with logits at the last position only.
- peer: `GptOssForCausalLM.from_pretrained(quantization_config=Mxfp4Config(dequantize=True))` +
  `peft.PeftModel.from_pretrained(adapter)` (unmerged, as a GRPO trainer samples from the live
  policy), eval mode, `generate(input_ids=[prompt] * G, do_sample=True, max_new_tokens=N,
  min_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0)`: pure sampling like ours (transformers'
  default top_k is 50), every row N tokens (min_new_tokens holds back the end-of-sequence ids).

Each side runs in its own process: load, one untimed warm-up generation of 4 tokens, then the timed
generations (best of --repeats: 2, --quick 1). Speed = tokens generated (all rows, counted from the
output; ours stops a row early only if it samples a stop id, which random weights almost never do)
/ wall time of the generation, prompt prefill included. Peak memory = the process's highest resident
set (VmHWM). Both sides first score the prompt once: their next-token distributions must agree (the
same model and adapter are being timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import status
from benchmarks.bench_train_step import QUICK_SHAPE, SHAPE, build_checkpoint

R, ALPHA = 16, 32
PROMPT = "A farmer has 17 sheep; all but 9 run away. How many are left? Explain step by step."


def build_adapter(base: Path, out: Path) -> Path:
    import model as modellib
    from finetune.run import save_adapter

    torch.manual_seed(0)
    m = modellib.from_pretrained(base, dtype=torch.float32, experts="mxfp4")
    modellib.add_lora(m, r=R, alpha=ALPHA, targets=("attention", "experts"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return save_adapter(m, out, base_model=str(base))


def _ours(path: Path, adapter: Path):
    import model as modellib
    from finetune.generate import generate_batch
    from finetune.run import attach_adapter

    m = modellib.from_pretrained(path, dtype=torch.float32, experts="mxfp4")
    attach_adapter(m, adapter)
    m.eval()

    def gen(prompt, g, n):
        return generate_batch(m, [prompt] * g, max_new_tokens=n, temperature=1.0, top_p=1.0,
                              generator=torch.Generator().manual_seed(0))

    def next_token_logprobs(prompt):
        with torch.no_grad():
            return torch.log_softmax(m(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1].float(), -1)

    return gen, next_token_logprobs


def _peer(path: Path, adapter: Path):
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config

    base = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.float32)
    m = PeftModel.from_pretrained(base, str(adapter)).eval()

    def gen(prompt, g, n):
        torch.manual_seed(0)
        ids = torch.tensor([prompt] * g)
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                         min_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=199999)
        return out[:, len(prompt):].tolist()

    def next_token_logprobs(prompt):
        with torch.no_grad():
            return torch.log_softmax(m(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)

    return gen, next_token_logprobs


def run_side(side: str, path: Path, adapter: Path, prompt: list[int], g: int, n: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    gen, score = (_ours if side == "ours" else _peer)(path, adapter)
    load_s = time.perf_counter() - t0
    logp = score(prompt)
    top = logp.topk(5)
    gen(prompt, g, 4)  # warm-up: allocator, thread pool, decode tables
    times, counts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = gen(prompt, g, n)
        times.append(time.perf_counter() - t)
        counts.append(sum(len(o) for o in outs))
    best = min(range(repeats), key=lambda i: times[i] / counts[i])
    return {"side": side, "tokens_per_s": counts[best] / times[best], "generate_s": times[best],
            "tokens": counts[best], "times": times, "counts": counts, "load_s": load_s,
            "top5_ids": top.indices.tolist(), "top5_logprobs": top.values.tolist(),
            "peak_rss_bytes": status("VmHWM:"), "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 4, 32 new tokens, one timed run")
    ap.add_argument("--generations", type=int, default=8, help="G: rows sampled from the prompt together")
    ap.add_argument("--new-tokens", type=int, default=None, help="N: tokens per row (default 128, quick 32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per side (default 2, quick 1)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 2)
    g = args.generations
    if args.side:
        prompt = json.loads(args.prompt_ids)
        print(json.dumps(run_side(args.side, Path(args.path), Path(args.adapter), prompt, g, n, repeats)))
        return {}
    import data as datalib

    prompt = datalib.render_prompt(PROMPT)
    with tempfile.TemporaryDirectory(prefix="bench_rollouts_") as tmp:
        path = build_checkpoint(Path(tmp) / "model", args.quick)
        adapter = build_adapter(path, Path(tmp) / "adapter")
        results = {}
        for side in ("ours", "peer"):
            cmd = [sys.executable, "-m", "benchmarks.bench_rollouts", "--side", side, "--path", str(path),
                   "--adapter", str(adapter), "--prompt-ids", json.dumps(prompt), "--generations", str(g),
                   "--new-tokens", str(n), "--repeats", str(repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                raise RuntimeError(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, peer = results["ours"], results["peer"]
    shape = QUICK_SHAPE if args.quick else SHAPE
    out = {
        "shape": {**shape, "vocab_size": 201088, "lora_r": R, "dtype": "float32", "prompt_tokens": len(prompt),
                  "generations": g, "new_tokens": n},
        "results": results,
        "speed_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
        "memory_ratio": ours["peak_rss_bytes"] / peer["peak_rss_bytes"],
        # the same model and adapter: the prompt's next-token distributions agree
        "same_top5": ours["top5_ids"] == peer["top5_ids"],
        "top5_logprob_max_diff": max(abs(a - b) for a, b in zip(ours["top5_logprobs"], peer["top5_logprobs"])),
    }
    print(f"GRPO rollouts with LoRA (r={R}, attention + experts), {shape['num_hidden_layers']} layers "
          f"H={shape['hidden_size']} E={shape['num_local_experts']} top-{shape['num_experts_per_tok']} V=201088, "
          f"{g} x {n} new tokens after a {len(prompt)}-token prompt, fp32 CPU, {ours['threads']} threads")
    for side, res in results.items():
        print(f"  {side:5s} {res['tokens_per_s']:8.1f} tokens/s  "
              f"({res['tokens']} tokens in {res['generate_s']:.2f} s)  "
              f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"  speed {out['speed_ratio']:.2f}x, peak RSS {out['memory_ratio']:.2f}x; prompt's next-token top-5 "
          f"{'agree' if out['same_top5'] else 'DIFFER'} (log-probs within {out['top5_logprob_max_diff']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
