"""MXFP4 codec: dequantization speed against transformers' decoder, and quantization error against the
OCP spec rule, measured side by side in one run.

    python -m benchmarks.bench_mxfp4 [--quick] [--json PATH]

Speed is reported in Gparam/s (decoded values per second) and as a fraction of plain-copy bandwidth:
a bf16 copy of the output tensor moves 4 bytes per value (read + write), the decoder moves 2.5
(0.5 read, 2 written) and gathers from a 256 KiB table, so the copy is a fair ceiling.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model import mxfp4


def best_time(fn, reps: int) -> float:
    fn()  # warm-up: tables, thread pool, allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_dequantize(shape: tuple[int, ...], reps: int) -> dict:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, shape[:-1], dtype=torch.uint8, generator=g)
    n = blocks.numel() * 2
    ours = best_time(lambda: mxfp4.dequantize(blocks, scales, torch.bfloat16), reps)
    theirs = best_time(lambda: convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16), max(1, reps // 2))
    src = torch.randn(n).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy = best_time(lambda: dst.copy_(src), reps)
    # Same values (theirs is transposed to HF's [E, in, out]); a benchmark of a wrong decoder is no benchmark.
    same = torch.equal(mxfp4.dequantize(blocks, scales).view(torch.int16),
                       convert_moe_packed_tensors(blocks, scales).transpose(1, 2).contiguous().view(torch.int16))
    return {
        "shape": list(shape), "params": n, "identical_output": same,
        "ours_gparam_s": n / ours / 1e9, "transformers_gparam_s": n / theirs / 1e9,
        "copy_gparam_s": n / copy / 1e9, "speedup": theirs / ours, "fraction_of_copy": copy / ours,
        "threads": torch.get_num_threads(),
    }


def bench_quantize_error(n_rows: int) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, w in (("gaussian", torch.randn(n_rows, 2880) * 0.02),
                    ("student_t3", torch.distributions.StudentT(3.0).sample((n_rows, 2880)) * 0.02)):
        ours, spec = mxfp4.quantization_mse(w), mxfp4.quantization_mse(w, rule="spec")
        out[name] = {"mse": ours, "spec_mse": spec, "ratio": ours / spec}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the experts, fewer repetitions")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    # gpt-oss-20b's gate_up_proj_blocks is [32, 5760, 90, 16]; 8 experts of it are plenty to time.
    shape = (2 if args.quick else 8, 5760, 90, 16)
    results = {
        "dequantize": bench_dequantize(shape, reps=3 if args.quick else 5),
        "quantize_error": bench_quantize_error(1024 if args.quick else 4096),
    }
    d = results["dequantize"]
    print(f"dequantize {d['shape']} bf16 ({d['threads']} threads): ours {d['ours_gparam_s']:.3f} Gparam/s, "
          f"transformers {d['transformers_gparam_s']:.3f} Gparam/s -> {d['speedup']:.1f}x; "
          f"plain copy {d['copy_gparam_s']:.3f} Gparam/s (ours reaches {d['fraction_of_copy']:.0%} of it); "
          f"identical output: {d['identical_output']}")
    for name, q in results["quantize_error"].items():
        print(f"quantize MSE {name}: ours/spec = {q['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
