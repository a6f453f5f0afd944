"""One LoRA fine-tuning step (attention + experts, r=16) of a scaled gpt-oss: ours against
transformers' `GptOssForCausalLM` with PEFT, on the same checkpoint, tokens, labels and batch.

    python -m benchmarks.bench_train_step [--quick] [--steps N] [--json PATH]

The model keeps gpt-oss-20b's vocabulary (201088), routing (32 experts, top-4) and head size (64)
at hidden 512, 4 layers; the batch is 2 x 512 tokens whose loss mask covers ~25% of them, in two
assistant-like spans per row (chat data trains the replies, not the prompts). Both sides run fp32
on CPU (what our trainer uses on CPU; bf16 matmuls on CPU are slower, not faster) and take the same
step: forward with labels, backward, AdamW on the LoRA parameters.

- ours: `model.from_pretrained(experts="mxfp4")` (experts stay MXFP4 and are decoded per expert on
  the fly), `add_lora(targets=("attention", "experts"))`, fused sink attention, logits only at
  labeled positions, in chunks.
- peer: what users run today: `GptOssForCausalLM.from_pretrained(quantization_config=
  Mxfp4Config(dequantize=True))` and PEFT `LoraConfig(target_modules=q/k/v/o_proj,
  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`.

Each side runs in its own process. Speed = input tokens / step time (best of the timed steps).
Peak memory = the process's highest resident set (VmHWM) over load and steps: what a user's machine
must hold. The step-only peak (VmHWM reset after the warm-up step) is reported next to it.
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

from benchmarks.measure import status, timed_steps

SHAPE = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_local_experts=32, num_experts_per_tok=4)
QUICK_SHAPE = dict(SHAPE, num_hidden_layers=2)  # same widths and vocab, half the layers
R, ALPHA = 16, 32


def build_checkpoint(out_dir: Path, quick: bool) -> Path:
    from model.checkpoint import write_random
    from model.config import MXFP4_QUANTIZATION_CONFIG, GptOssConfig

    cfg = GptOssConfig(**(QUICK_SHAPE if quick else SHAPE), quantization_config=MXFP4_QUANTIZATION_CONFIG)
    return write_random(out_dir, cfg, seed=0, experts="mxfp4")


def batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and labels masked outside two reply-like spans per row (~25% of tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    span = seq_len // 8
    for row in range(batch_size):
        for start in (seq_len // 2 - span, seq_len - span):  # a mid-conversation reply and the last one
            s = start + int(torch.randint(-span // 4, span // 4, (1,), generator=g))
            labels[row, s:s + span] = ids[row, s:s + span]
    return ids, labels


def _ours(path: Path):
    import model as modellib
    from model.lora import add_lora

    m = modellib.from_pretrained(path, dtype=torch.float32, experts="mxfp4")
    add_lora(m, r=R, alpha=ALPHA, targets=("attention", "experts"))
    m.train()
    return (lambda ids, labels: m(ids, labels=labels).loss), m


def _peer(path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM, Mxfp4Config

    m = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                          dtype=torch.float32)
    m = get_peft_model(m, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    m.train()
    return (lambda ids, labels: m(input_ids=ids, labels=labels).loss), m


def run_side(side: str, path: Path, batch_size: int, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    base_rss = status("VmRSS:")
    t0 = time.perf_counter()
    loss_fn, m = (_ours if side == "ours" else _peer)(path)
    load_s = time.perf_counter() - t0
    params = [p for p in m.parameters() if p.requires_grad]
    # Both adapters start with B = 0 (PEFT's init), so both first losses are the base model's.
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels = batch(batch_size, seq_len, m.config.vocab_size)

    def step() -> float:
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    timed = timed_steps(step, steps)
    return {"side": side, "tokens_per_s": batch_size * seq_len / timed["step_s"], **timed, "load_s": load_s,
            "trainable_params": sum(p.numel() for p in params), "base_rss_bytes": base_rss,
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 4, one timed step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (default 3, quick 1)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (1 if args.quick else 3)
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.path), args.batch_size, args.seq_len, steps)))
        return {}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        path = build_checkpoint(Path(tmp) / "model", args.quick)
        size = sum(f.stat().st_size for f in path.iterdir())
        results = {}
        for side in ("ours", "peer"):
            cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--side", side, "--path", str(path),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                raise RuntimeError(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, peer = results["ours"], results["peer"]
    shape = QUICK_SHAPE if args.quick else SHAPE
    out = {
        "shape": {**shape, "vocab_size": 201088, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "lora_r": R, "dtype": "float32", "checkpoint_bytes": size},
        "results": results,
        "speed_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
        "memory_ratio": ours["peak_rss_bytes"] / peer["peak_rss_bytes"],
        "step_memory_ratio": ours["step_peak_rss_bytes"] / peer["step_peak_rss_bytes"],
        # Same weights and tokens, zero-init B: the first losses must agree (a benchmark of a
        # different computation is no benchmark).
        "first_loss_rel_diff": abs(ours["first_loss"] - peer["first_loss"]) / abs(peer["first_loss"]),
    }
    print(f"LoRA step, {shape['num_hidden_layers']} layers H={shape['hidden_size']} E={shape['num_local_experts']} "
          f"top-{shape['num_experts_per_tok']} V=201088, batch {args.batch_size}x{args.seq_len}, r={R}, fp32 CPU, "
          f"{ours['threads']} threads")
    for side, res in results.items():
        print(f"  {side:5s} {res['tokens_per_s']:8.1f} tokens/s  step {res['step_s']:.2f} s  "
              f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB (step-only {res['step_peak_rss_bytes'] / 2**30:.2f})  "
              f"first loss {res['first_loss']:.4f}  trainable {res['trainable_params']:,}")
    print(f"  speed {out['speed_ratio']:.2f}x (goal >= 1.5x), peak RSS {out['memory_ratio']:.2f}x (goal <= 0.5x), "
          f"first losses agree to {out['first_loss_rel_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
