"""Long context on CPU: peak RSS of one LoRA training step against sequence length, measured and planned.

    python -m benchmarks.bench_long_context [--lengths 2048 4096 8192 16384 32768] [--moe-chunk N] [--json OUT]

A random gpt-oss of `SHAPE` (4 layers, hidden 512, 8 experts top-4, MXFP4 experts, gpt-oss's
vocabulary and head size 64) is written once. For each length L a fresh process takes the trainer's
own path for one optimizer step: `finetune.trainer.load_model` of a config with LoRA r=16 on
attention and experts, gradient checkpointing and the long-context keys given, fp32 on CPU, an
Accelerator, glibc's fixed mmap threshold and deterministic kernels (as the trainer on CPU), AdamW
on the adapters, then forward with labels on one row of L
random tokens (all trained), backward and the optimizer step. Measured: the step's peak RSS (VmHWM
reset to the current RSS right before the step, so it is the resident weights, imports and
optimizer plus the step's own peak), and the whole process's peak (RUSAGE_CHILDREN, read by the
parent), which at short lengths is the model load's, not the step's. The plan is
`finetune.plan.plan` for the same model and options (`--device cpu`), which plans the step.

The slope between two lengths, (peak(L2) - peak(L1)) / (L2 - L1), cancels the fixed costs (weights,
imports, allocator arenas) and is what the planner must predict (issue 17: within 15%).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
SHAPE = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=4)
"""The issue's "4 layers, hidden 512, 8 experts"; 4 query heads keep the 32k step to minutes on 2 cores."""


def _config(base: str, out: str, seq_len: int, moe_chunk: int | None, offload: bool):
    from finetune import config as cfglib

    return cfglib.from_dict({
        "model": {"path": base, "experts": "mxfp4", "dtype": "float32", "gradient_checkpointing": True,
                  "offload_activations": offload, "moe_chunk_size": moe_chunk},
        "data": {"train": "unused", "max_seq_len": seq_len},
        "method": "lora", "lora": {"r": 16, "alpha": 32, "targets": ["attention", "experts"]},
        "train": {"max_steps": 1, "batch_size": 1, "lr": 1e-4}, "output_dir": out}, check_paths=False)


def child(base: str, seq_len: int, moe_chunk: int | None, offload: bool, out: str) -> None:
    """One training step at `seq_len` tokens (see the module docstring); writes its figures to `out`."""
    import torch
    from accelerate import Accelerator

    from benchmarks.measure import reset_peak, status
    from finetune.trainer import (
        _deterministic_algorithms,
        load_model,
        return_freed_memory_to_the_os,
    )

    Accelerator(cpu=True)
    return_freed_memory_to_the_os()  # as `gptoss-ft train` on CPU
    cfg = _config(base, str(Path(out).parent / "run"), seq_len, moe_chunk, offload)
    m = load_model(cfg, torch.device("cpu"))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    ids = torch.randint(0, m.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    before, load_peak = status("VmRSS:"), status("VmHWM:")
    reset_peak()
    t0 = time.perf_counter()
    with _deterministic_algorithms(True):  # as the trainer on CPU
        loss = m(ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    Path(out).write_text(json.dumps({"rss_before_step": before, "load_peak": load_peak, "step_peak": status("VmHWM:"),
                                     "loss": loss.item(),
                                     "forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t0}))


def measure(base: Path, seq_len: int, moe_chunk: int | None, offload: bool) -> dict:
    """Runs `child` in a fresh process; returns its figures and its peak RSS (RUSAGE_CHILDREN)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_long_context", "--child", str(base), str(seq_len),
               str(moe_chunk or 0), str(int(offload)), str(out)]
        # a parent that ran nothing else: RUSAGE_CHILDREN is this child's peak
        probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
        r = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, cwd=ROOT)
        figures = json.loads(out.read_text())
    figures["peak_rss"] = int(r.stdout.split()[-1])
    return figures


def planned(base: Path, seq_len: int, moe_chunk: int | None, offload: bool):
    from finetune import plan as planlib

    return planlib.plan(str(base), method="lora", seq_len=seq_len, device="cpu", gradient_checkpointing=True,
                        dtype="float32", moe_chunk_size=moe_chunk, offload_activations=offload)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--moe-chunk", type=int, default=None, help="model.moe_chunk_size (default: none)")
    ap.add_argument("--offload", action="store_true", help="model.offload_activations (on CPU: the hooks run, "
                                                           "nothing moves)")
    ap.add_argument("--base", default=None, help="the random model's directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--replan", default=None, metavar="JSON",
                    help="plan again the measurements of an earlier --json (same options), running no step")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        base, seq_len, chunk, offload, out = args.child
        child(base, int(seq_len), int(chunk) or None, bool(int(offload)), out)
        return {}
    from model.checkpoint import write_random
    from model.config import GptOssConfig, preset

    tmp = tempfile.TemporaryDirectory(prefix="bench-long-context-")
    base = Path(args.base or Path(tmp.name) / "base")
    if not (base / "config.json").exists():
        write_random(base, GptOssConfig(**SHAPE, quantization_config=preset("tiny").quantization_config), seed=0)
    earlier = {}
    if args.replan:
        prev = json.loads(Path(args.replan).read_text())
        args.moe_chunk, args.offload = prev["moe_chunk_size"], prev["offload_activations"]
        args.lengths = [r["seq_len"] for r in prev["results"]]
        earlier = {r["seq_len"]: {"step_peak": r["measured_bytes"], "peak_rss": r["process_peak_bytes"],
                                  **{k: r[k] for k in ("step_s", "forward_s", "backward_s", "loss", "rss_before_step",
                                                       "load_peak")}} for r in prev["results"]}
    rows = []
    for n in args.lengths:
        m = earlier.get(n) or measure(base, n, args.moe_chunk, args.offload)
        p = planned(base, n, args.moe_chunk, args.offload)
        rows.append({"seq_len": n, "measured_bytes": m["step_peak"], "process_peak_bytes": m["peak_rss"],
                     "planned_bytes": p.peak_bytes, "planned_breakdown": p.to_dict()["breakdown"],
                     "planned_notes": p.notes, **{k: m[k] for k in
                     ("step_s", "forward_s", "backward_s", "loss", "rss_before_step", "load_peak")}})
        print(f"{n:>6} tokens: step peak RSS {m['step_peak'] / GIB:.2f} GiB (process {m['peak_rss'] / GIB:.2f}), "
              f"planned {p.peak_bytes / GIB:.2f} GiB ({p.peak_bytes / m['step_peak'] - 1:+.0%}); "
              f"step {m['step_s']:.0f} s", flush=True)
    slopes = []
    for a, b in itertools.pairwise(rows):
        d = b["seq_len"] - a["seq_len"]
        s = {"from": a["seq_len"], "to": b["seq_len"],
             "measured_bytes_per_token": (b["measured_bytes"] - a["measured_bytes"]) / d,
             "planned_bytes_per_token": (b["planned_bytes"] - a["planned_bytes"]) / d}
        s["ratio"] = s["planned_bytes_per_token"] / s["measured_bytes_per_token"]
        slopes.append(s)
        print(f"slope {a['seq_len']} -> {b['seq_len']}: measured {s['measured_bytes_per_token'] / 1024:.1f} KiB/token, "
              f"planned {s['planned_bytes_per_token'] / 1024:.1f} KiB/token ({s['ratio'] - 1:+.1%})", flush=True)
    out = {"shape": SHAPE, "moe_chunk_size": args.moe_chunk, "offload_activations": args.offload,
           "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(), "results": rows, "slopes": slopes}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
