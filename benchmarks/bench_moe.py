"""One gpt-oss MoE expert layer with LoRA, forward + backward: ours (frozen MXFP4 experts decoded per
expert on the fly, LoRA as x A_e B_e) against transformers' `GptOssExperts` with PEFT
`target_parameters` LoRA on the same weights (dequantized), tokens, routing and adapter values.

    python -m benchmarks.bench_moe [--quick] [--tokens N] [--json PATH]

Each side runs in its own process so peak memory is its own: peak = highest resident set during
the timed steps (Linux VmHWM, reset after setup) minus the resident set before its weights were
built, so weights, activations and transients all count. Speed = routed tokens per second of one
forward + backward, best of the timed steps; one untimed warm-up step comes first (ours' first step
costs ~3x a later one: allocator, decode table, thread pool). Both shapes are expert-heavy like
gpt-oss-20b (E=32, top-4, so 512 tokens give each expert ~64 rows): default H=I=1024, --quick
H=I=512 (same ratio within a few percent, a quarter of the expert bytes). fp32 on CPU, LoRA r=16
on gate_up_proj and down_proj.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.measure import reset_peak, status

SHAPES = {
    # gpt-oss-20b's expert count and top-k (32, 4) at a third of its width (2880): ~1 min on 2 cores
    "default": dict(experts=32, hidden=1024, width=1024, top_k=4),
    # the same routing at H=I=512 (the LoRA-step model's width): ~25 s. E=8 here once measured
    # something else: 256 rows per expert and an 8-expert B A, where PEFT's dense update is cheap.
    "quick": dict(experts=32, hidden=512, width=512, top_k=4),
}


def _inputs(shape, tokens, r, seed=0):
    """MXFP4 weights, routed tokens and nonzero LoRA factors, identical for both sides.

    The MXFP4 codes are drawn directly (uniform nibbles, scales 2^-9..2^-6, so |w| <= 0.09 like
    gpt-oss's experts): quantizing float weights first would cost each process tens of seconds at the
    default shape and change nothing that is timed.
    """
    g = torch.Generator().manual_seed(seed)
    e, h, i, k = shape["experts"], shape["hidden"], shape["width"], shape["top_k"]

    def codes(out_f, in_f):  # [E, out, in] with blocks along in
        return (torch.randint(0, 256, (e, out_f, in_f // 32, 16), dtype=torch.uint8, generator=g),
                torch.randint(118, 122, (e, out_f, in_f // 32), dtype=torch.uint8, generator=g))

    w1, w2 = codes(2 * i, h), codes(h, i)
    b1, b2 = torch.randn(e, 2 * i, generator=g) * 0.02, torch.randn(e, h, generator=g) * 0.02
    x = torch.randn(tokens, h, generator=g)
    top, idx = torch.topk(torch.randn(tokens, e, generator=g), k, dim=-1)
    weights = torch.softmax(top, -1)
    lora = {  # PEFT layout: A [r*E, in], B [out, r*E]
        "gate_up": (torch.randn(r * e, h, generator=g) * 0.01, torch.randn(2 * i, r * e, generator=g) * 0.01),
        "down": (torch.randn(r * e, i, generator=g) * 0.01, torch.randn(h, r * e, generator=g) * 0.01),
    }
    return w1, w2, b1, b2, x, idx, weights, lora


def _ours(shape, w1, w2, b1, b2, lora, r):
    from model.config import GptOssConfig
    from model.experts import Experts

    cfg = GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["width"],
                       num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    ex = Experts(cfg, fmt="mxfp4")
    ex.add_lora(r=r, alpha=2 * r)
    with torch.no_grad():
        ex.gate_up_proj_blocks.copy_(w1[0]), ex.gate_up_proj_scales.copy_(w1[1])
        ex.down_proj_blocks.copy_(w2[0]), ex.down_proj_scales.copy_(w2[1])
        ex.gate_up_proj_bias.copy_(b1), ex.down_proj_bias.copy_(b2)
        ex.base_layer.lora_A.weight.copy_(lora["gate_up"][0]), ex.base_layer.lora_B.weight.copy_(lora["gate_up"][1])
        ex.lora_A.weight.copy_(lora["down"][0]), ex.lora_B.weight.copy_(lora["down"][1])
    for p in ex.parameters():
        p.requires_grad_(False)
    lora_params = [ex.base_layer.lora_A.weight, ex.base_layer.lora_B.weight, ex.lora_A.weight, ex.lora_B.weight]
    for p in lora_params:
        p.requires_grad_(True)
    return (lambda x, idx, w: ex(x, idx, w)), lora_params


def _transformers(shape, w1, w2, b1, b2, lora, r):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from model import mxfp4

    cfg = GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["width"],
                       num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    holder = torch.nn.Module()
    holder.mlp = torch.nn.Module()
    holder.mlp.experts = GptOssExperts(cfg)
    ex = holder.mlp.experts
    with torch.no_grad():  # HF's bf16/fp32 layout is [E, in, out]
        ex.gate_up_proj.copy_(mxfp4.dequantize(*w1, torch.float32).transpose(1, 2))
        ex.down_proj.copy_(mxfp4.dequantize(*w2, torch.float32).transpose(1, 2))
        ex.gate_up_proj_bias.copy_(b1), ex.down_proj_bias.copy_(b2)
    peft = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    wrapped = peft.base_model.model.mlp.experts  # ParamWrapper(down) around ParamWrapper(gate_up)
    with torch.no_grad():
        wrapped.base_layer.lora_A["default"].weight.copy_(lora["gate_up"][0])
        wrapped.base_layer.lora_B["default"].weight.copy_(lora["gate_up"][1])
        wrapped.lora_A["default"].weight.copy_(lora["down"][0])
        wrapped.lora_B["default"].weight.copy_(lora["down"][1])
    lora_params = [p for n, p in peft.named_parameters() if p.requires_grad]
    assert len(lora_params) == 4
    impl = getattr(cfg, "_experts_implementation", None) or "eager"  # standalone module: the eager loop
    return (lambda x, idx, w: wrapped(x, idx, w)), lora_params, impl


def run_side(side: str, shape_name: str, tokens: int, r: int, steps: int) -> dict:
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    w1, w2, b1, b2, x, idx, weights, lora = _inputs(shape, tokens, r)
    base_rss = status("VmRSS:")
    if side == "ours":
        fn, params = _ours(shape, w1, w2, b1, b2, lora, r)
        impl = "mxfp4 sorted groups"
    else:
        fn, params, impl = _transformers(shape, w1, w2, b1, b2, lora, r)
    del w1, w2  # the inputs' own copies are not part of either side
    x = x.requires_grad_()
    grad_out = torch.randn(tokens, shape["hidden"], generator=torch.Generator().manual_seed(1))

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y = fn(x, idx, weights)
        y.backward(grad_out)
        return y

    y = step()  # warm-up (not timed): allocator, decode table, thread pool
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - t0)
    peak = status("VmHWM:") - base_rss
    checksum = {"y": y.detach().double().norm().item(), "x_grad": x.grad.double().norm().item(),
                "lora_grad": sum(p.grad.double().norm().item() for p in params)}
    return {"side": side, "impl": impl, "tokens_per_s": tokens / min(times), "step_s": min(times),
            "step_times": times, "peak_bytes": peak, "checksum": checksum, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="H=I=512 instead of 1024 (same E=32, top-4)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up step")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = args.shape or ("quick" if args.quick else "default")
    if args.side:
        print(json.dumps(run_side(args.side, shape, args.tokens, args.r, args.steps)))
        return 0
    results = {}
    for side in ("ours", "transformers"):
        cmd = [sys.executable, "-m", "benchmarks.bench_moe", "--side", side, "--shape", shape,
               "--tokens", str(args.tokens), "--r", str(args.r), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ours, ref = results["ours"], results["transformers"]
    agree = max(abs(ours["checksum"][k] - ref["checksum"][k]) / abs(ref["checksum"][k]) for k in ours["checksum"])
    s = SHAPES[shape]
    print(f"MoE layer fwd+bwd, E={s['experts']} H={s['hidden']} I={s['width']} top-{s['top_k']}, "
          f"{args.tokens} tokens, LoRA r={args.r}, fp32, {torch.get_num_threads()} threads")
    for side, res in results.items():
        print(f"  {side:13s} {res['tokens_per_s']:9.1f} tokens/s  step {res['step_s']:.2f} s  "
              f"peak {res['peak_bytes'] / 2**30:.2f} GiB  ({res['impl']})")
    speed = ours["tokens_per_s"] / ref["tokens_per_s"]
    mem = ours["peak_bytes"] / ref["peak_bytes"]
    print(f"  speed ratio {speed:.2f}x (goal >= 3x), memory ratio {mem:.2f}x (goal <= 0.5x), "
          f"outputs/grads agree to {agree:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {**s, "tokens": args.tokens, "lora_r": args.r, "dtype": "float32"},
                       "results": results, "speed_ratio": speed, "memory_ratio": mem, "agreement": agree}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
