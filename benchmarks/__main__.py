"""Every benchmark, one command: `python -m benchmarks [--quick]` writes benchmarks/RESULTS.md and
benchmarks/results.json.

Each row measures ours and the peer in the same run, on this machine, on the same weights, tokens
and batch (the scripts below say how); the ratio is what counts, since a shared machine's absolute
figures move with its load (recorded next to the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GIB = 2 ** 30


def _train_step(quick: bool) -> list[dict]:
    from benchmarks import bench_train_step

    r = bench_train_step.main(["--quick"] if quick else [])
    ours, peer = r["results"]["ours"], r["results"]["peer"]
    s = r["shape"]
    full_layers = bench_train_step.SHAPE["num_hidden_layers"]
    layers = f"{s['num_hidden_layers']} layers" + (f" (--quick; the full run has {full_layers})"
                                                  if s["num_hidden_layers"] != full_layers else "")
    what = (f"LoRA step (attn+experts, r={s['lora_r']}), {layers} H={s['hidden_size']} E={s['num_local_experts']} "
            f"top-{s['num_experts_per_tok']} V={s['vocab_size']}, batch {s['batch_size']}x{s['seq_len']}, "
            f"~25% tokens trained, fp32 CPU")
    same = r["first_loss_rel_diff"] < 1e-4  # same weights and tokens: the first losses must agree
    return [
        {"what": what + ": tokens/s", "ours": ours["tokens_per_s"], "peer": peer["tokens_per_s"],
         "peer_name": "transformers GptOss + PEFT target_parameters", "ratio": r["speed_ratio"],
         "goal": ">= 1.5x", "met": r["speed_ratio"] >= 1.5 and same, "unit": "tokens/s", "detail": r},
        {"what": what + ": peak RSS", "ours": ours["peak_rss_bytes"] / GIB, "peer": peer["peak_rss_bytes"] / GIB,
         "peer_name": "transformers GptOss + PEFT target_parameters", "ratio": r["memory_ratio"],
         "goal": "<= 0.5x", "met": r["memory_ratio"] <= 0.5, "unit": "GiB"},
    ]


def _moe(quick: bool) -> list[dict]:
    from benchmarks import bench_moe

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        bench_moe.main((["--quick"] if quick else []) + ["--json", f.name])
        r = json.loads(Path(f.name).read_text())
    ours, peer = r["results"]["ours"], r["results"]["transformers"]
    s = r["shape"]
    full_h = bench_moe.SHAPES["default"]["hidden"]
    quick_note = f" (--quick; the full run has {full_h})" if s["hidden"] != full_h else ""
    what = (f"MoE layer + expert LoRA (r={s['lora_r']}) fwd+bwd, E={s['experts']} top-{s['top_k']} "
            f"H=I={s['hidden']}{quick_note}, {s['tokens']} tokens, fp32")
    same = r["agreement"] < 1e-4  # outputs and gradients of the two sides agree
    return [
        {"what": what + ": tokens/s", "ours": ours["tokens_per_s"], "peer": peer["tokens_per_s"],
         "peer_name": "transformers GptOssExperts + PEFT", "ratio": r["speed_ratio"], "goal": ">= 3x",
         "met": r["speed_ratio"] >= 3 and same, "unit": "tokens/s", "detail": r},
        {"what": what + ": peak memory", "ours": ours["peak_bytes"] / GIB, "peer": peer["peak_bytes"] / GIB,
         "peer_name": "transformers GptOssExperts + PEFT", "ratio": r["memory_ratio"], "goal": "(reported)",
         "met": None, "unit": "GiB"},
    ]


def _mxfp4(quick: bool) -> list[dict]:
    from benchmarks import bench_mxfp4

    r = bench_mxfp4.main(["--quick"] if quick else [])
    d = r["dequantize"]
    rows = [
        {"what": f"MXFP4 dequantize {d['shape']} -> bf16 (identical output: {d['identical_output']})",
         "ours": d["ours_gparam_s"], "peer": d["transformers_gparam_s"],
         "peer_name": "transformers convert_moe_packed_tensors", "ratio": d["speedup"], "goal": ">= 10x",
         "met": d["speedup"] >= 10 and d["identical_output"], "unit": "Gparam/s", "detail": r},
        {"what": "MXFP4 dequantize as a fraction of a plain bf16 copy of the output", "ours": d["ours_gparam_s"],
         "peer": d["copy_gparam_s"], "peer_name": "torch copy_", "ratio": d["fraction_of_copy"],
         "goal": "(reported)", "met": None, "unit": "Gparam/s"},
    ]
    for name, q in r["quantize_error"].items():
        rows.append({"what": f"MXFP4 quantize MSE, {name} weights", "ours": q["mse"], "peer": q["spec_mse"],
                     "peer_name": "OCP spec scale rule", "ratio": q["ratio"], "goal": "< 1x",
                     "met": q["ratio"] < 1, "unit": "MSE"})
    return rows


def _harmony(quick: bool) -> list[dict]:
    from benchmarks import bench_harmony

    r = bench_harmony.main(["--rows", "500" if quick else "2000"])
    return [{"what": f"Harmony render + tokenize, {r['rows']} rows -> {r['examples']} examples (one process)",
             "ours": r["examples"] / r["ours_s"], "peer": r["examples"] / r["openai_harmony_s"],
             "peer_name": "openai-harmony render_conversation_for_training", "ratio": r["speedup"],
             "goal": ">= 1x", "met": r["speedup"] >= 1, "unit": "examples/s", "detail": r}]


def _export(quick: bool) -> list[dict]:
    from benchmarks import bench_export

    r = bench_export.main(["--quick"] if quick else [])
    size = r["merged_bytes"] / GIB
    layers = r["num_hidden_layers"]
    full = bench_export.SHAPE["num_hidden_layers"]
    model = f"{layers}-layer H=512 E=32 V=201088 LoRA run"
    if layers != full:
        model += f" (--quick; the full run has {full})"
    return [
        {"what": f"export --format merged of a {model}, peak RSS (merged bf16 model {size:.2f} GiB)",
         "ours": r["ours_merged_peak"] / GIB, "peer": r["peer_merged_peak"] / GIB,
         "peer_name": "transformers + PEFT merge_and_unload + save_pretrained", "ratio": r["memory_ratio"],
         "goal": "(reported)", "met": None, "unit": "GiB", "detail": r},
        {"what": "export --format mxfp4 (GPTQ), peak RSS / merged bf16 model size", "ours": r["ours_mxfp4_peak"] / GIB,
         "peer": size, "peer_name": "merged bf16 model size", "ratio": r["ours_mxfp4_peak"] / r["merged_bytes"],
         "goal": "(reported)", "met": None, "unit": "GiB"},
    ]


def _dpo(quick: bool) -> list[dict]:
    from benchmarks import bench_dpo

    r = bench_dpo.main(["--quick"] if quick else [])
    ours, peer = r["results"]["ours"], r["results"]["trl"]
    s = r["shape"]
    full_layers = bench_dpo.SHAPE["num_hidden_layers"]
    layers = f"{s['num_hidden_layers']} layers" + (f" (--quick; the full run has {full_layers} and twice the tokens)"
                                                  if s["num_hidden_layers"] != full_layers else "")
    what = (f"DPO LoRA step (sigmoid, attn+experts, r={s['lora_r']}), {layers} H={s['hidden_size']} "
            f"E={s['num_local_experts']} top-{s['num_experts_per_tok']} V={s['vocab_size']}, {s['pairs']} pairs "
            f"({s['prompt']}-token prompt, {s['chosen']}/{s['rejected']}-token completions), fp32 CPU")
    same = r["first_logps_rel_diff"] < 1e-4  # B = 0: both sides' first-step log-probs are the base model's
    peer_name = "TRL DPOTrainer + PEFT on transformers GptOss, reference forward in each step"
    return [
        {"what": what + ": tokens/s, ours charged its one-off reference pass on every step", "ours":
         ours["tokens_per_s_with_ref"], "peer": peer["tokens_per_s"], "peer_name": peer_name, "ratio": r["speed_ratio"],
         "goal": ">= 1.5x", "met": r["speed_ratio"] >= 1.5 and same, "unit": "tokens/s", "detail": r},
        {"what": what + ": tokens/s, step alone (ours' reference log-probs precomputed)", "ours": ours["tokens_per_s"],
         "peer": peer["tokens_per_s"], "peer_name": peer_name, "ratio": r["speed_ratio_step_only"],
         "goal": "(reported)", "met": None, "unit": "tokens/s"},
        {"what": what + ": peak RSS", "ours": ours["peak_rss_bytes"] / GIB, "peer": peer["peak_rss_bytes"] / GIB,
         "peer_name": peer_name, "ratio": r["memory_ratio"], "goal": "<= 0.5x", "met": r["memory_ratio"] <= 0.5,
         "unit": "GiB"},
    ]


def _rollouts(quick: bool) -> list[dict]:
    from benchmarks import bench_rollouts

    r = bench_rollouts.main(["--quick"] if quick else [])
    ours, peer = r["results"]["ours"], r["results"]["peer"]
    s = r["shape"]
    full_layers = bench_rollouts.SHAPE["num_hidden_layers"]
    layers = f"{s['num_hidden_layers']} layers" + (f" (--quick; the full run has {full_layers})"
                                                  if s["num_hidden_layers"] != full_layers else "")
    what = (f"GRPO rollouts with LoRA (attn+experts, r={s['lora_r']}), {layers} H={s['hidden_size']} "
            f"E={s['num_local_experts']} top-{s['num_experts_per_tok']} V={s['vocab_size']}, {s['generations']} x "
            f"{s['new_tokens']} sampled tokens after a {s['prompt_tokens']}-token prompt, fp32 CPU: tokens/s")
    return [{"what": what, "ours": ours["tokens_per_s"], "peer": peer["tokens_per_s"],
             "peer_name": "transformers generate + PEFT (unmerged)", "ratio": r["speed_ratio"], "goal": "(reported)",
             "met": None if r["same_top5"] else False, "unit": "tokens/s", "detail": r}]


def _data_scale(quick: bool) -> list[dict]:
    from benchmarks import bench_data_scale

    r = bench_data_scale.main(["--rows", "2000", "20000"] if quick else [])
    big, slope = r["results"][-1], r["slopes"][-1]
    what = (f"SFT data, {big['rows']:,} generated rows ({big['tokens']:,} tokens) -> packed batches "
            f"(seq {r['seq_len']}), rendering on {r['cores']} cores")
    span = f"{slope['from_rows']:,} -> {slope['to_rows']:,} rows"
    return [
        {"what": f"{what}: peak RSS growth per token, first load ({span})", "ours": slope["first_bytes_per_token"],
         "peer": None, "peer_name": "goal", "ratio": None, "goal": "<= 10 B/token",
         "met": slope["first_bytes_per_token"] <= 10, "unit": "B/token", "detail": r},
        {"what": f"{what}: peak RSS growth per token, cached load ({span})", "ours": slope["cached_bytes_per_token"],
         "peer": None, "peer_name": "goal", "ratio": None, "goal": "<= 10 B/token",
         "met": slope["cached_bytes_per_token"] <= 10, "unit": "B/token"},
        {"what": f"{what}: load + pack, cached (a second, resumed or other-process run) against first",
         "ours": big["cached"]["load_and_pack_s"], "peer": big["first"]["load_and_pack_s"],
         "peer_name": "first load, rendering", "ratio": big["cached"]["load_and_pack_s"] / big["first"]["load_and_pack_s"],
         "goal": "(reported)", "met": None, "unit": "s"},
    ]


def _long_context(quick: bool) -> list[dict]:
    from benchmarks import bench_long_context

    r = bench_long_context.main(["--lengths", *(["2048", "4096"] if quick else ["8192", "16384"])])
    s, last = r["slopes"][-1], r["results"][-1]
    shape = r["shape"]
    what = (f"LoRA step (attn+experts, r=16, gradient checkpointing), {shape['num_hidden_layers']} layers "
            f"H={shape['hidden_size']} E={shape['num_local_experts']} top-{shape['num_experts_per_tok']}, batch 1, fp32 CPU")
    return [
        {"what": f"{what}: peak RSS growth per token, {s['from']} -> {s['to']} tokens",
         "ours": s["measured_bytes_per_token"] / 1024, "peer": s["planned_bytes_per_token"] / 1024,
         "peer_name": "gptoss-ft plan --device cpu", "ratio": s["ratio"], "goal": "0.85-1.15x",
         "met": 0.85 <= s["ratio"] <= 1.15, "unit": "KiB/token", "detail": r},
        {"what": f"{what}: step peak RSS at {last['seq_len']} tokens", "ours": last["measured_bytes"] / GIB,
         "peer": last["planned_bytes"] / GIB, "peer_name": "gptoss-ft plan --device cpu",
         "ratio": last["planned_bytes"] / last["measured_bytes"], "goal": "(reported)", "met": None, "unit": "GiB"},
    ]


BENCHES = {"train_step": _train_step, "moe": _moe, "mxfp4": _mxfp4, "harmony": _harmony, "export": _export,
           "dpo": _dpo, "rollouts": _rollouts, "data_scale": _data_scale, "long_context": _long_context}


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:,.2f}"
    return str(x)


def _merged(old: dict, new: dict, only: set[str]) -> dict:
    """`old` results with the rows and timings of the benchmarks in `only` taken from `new` (rows
    written before rows named their benchmark belong to the full run's others). Its header stays
    the run that produced most rows; each partial run is listed with its own environment."""
    rows = [r for r in old["rows"] if r.get("bench") not in only] + new["rows"]
    partial = [p for p in old.get("partial_runs", []) if not set(p["only"]) <= only]
    partial.append({"only": sorted(only), "s": new["total_s"], "quick": new["quick"], "environment": new["environment"]})
    return {**old, "rows": rows, "benchmarks": {**old.get("benchmarks", {}), **new["benchmarks"]},
            "partial_runs": partial}


def write_markdown(path: Path, out: dict) -> None:
    env = out["environment"]
    per = "; ".join(f"{name} {b['s']:.0f} s ({b['load_before']} -> {b['load_after']})"
                    for name, b in out.get("benchmarks", {}).items())
    lines = [
        "# Benchmarks",
        "",
        f"`python -m benchmarks{' --quick' if out['quick'] else ''}` on {env['cpu']} "
        f"({env['threads']} torch threads), torch {env['torch']}, Python {env['python']}; "
        f"load average {env['load_before']} before, {env['load_after']} after (the machine is shared: "
        "same-run ratios count, absolute figures move with load); "
        f"OMP_WAIT_POLICY={env.get('omp_wait_policy') or 'unset'} (see benchmarks/__init__.py).",
        f"This run took {out['total_s'] / 60:.1f} min"
        + (" (--quick)." if out["quick"] else " (full run).")
        + (f" The last full run took {out['full_run_s'] / 60:.1f} min." if out.get("full_run_s") else "")
        + (f" Per benchmark (1-min load average before -> after): {per}." if per else ""),
        *(f"Re-run alone with `--only {' '.join(p['only'])}`{' --quick' if p['quick'] else ''}: "
          f"{p['s'] / 60:.1f} min, load average {p['environment']['load_before']} before, "
          f"{p['environment']['load_after']} after." for p in out.get("partial_runs", [])),
        "",
        "| what | ours | peer | ratio | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        note = f" {r['note']}" if r.get("note") else ""
        lines.append(f"| {r['what']}{note} | {_fmt(r['ours'])} {r['unit']} | {_fmt(r['peer'])} {r['unit']} "
                     f"({r['peer_name']}) | {_fmt(r['ratio'])}x | {r['goal']} | {met} |")
    lines += ["", "Details (every measured figure, per side) are in `results.json`; each script's docstring "
              "says what it times and how memory is read (`python -m benchmarks.bench_X --help`)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions (< 5 minutes)")
    ap.add_argument("--only", nargs="*", choices=list(BENCHES), help="run these rows only")
    ap.add_argument("--out", default=str(HERE), help="directory for RESULTS.md and results.json")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    t0 = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows, benches = [], {}
    for name in args.only or BENCHES:
        print(f"== {name}", flush=True)
        t, load = time.perf_counter(), f"{os.getloadavg()[0]:.1f}"
        rows += [{**row, "bench": name} for row in BENCHES[name](args.quick)]
        benches[name] = {"s": time.perf_counter() - t, "load_before": load, "load_after": f"{os.getloadavg()[0]:.1f}"}
        print(f"   ({benches[name]['s']:.0f} s)", flush=True)
    total = time.perf_counter() - t0
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out = {"quick": args.quick, "total_s": total, "benchmarks": benches, "rows": rows,
           "environment": {"cpu": f"{cpu}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "load_before": load_before, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                           "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg())}}
    previous = out_dir / "results.json"
    if previous.exists():  # keep the last full run's duration next to a quick run's
        old = json.loads(previous.read_text())
        out["full_run_s"] = old["total_s"] if not old.get("quick") else old.get("full_run_s")
        if args.only:  # a partial run replaces its benchmarks' rows; the others stay as the last run left them
            out = _merged(old, out, set(args.only))
    if not args.quick and not args.only:
        out["full_run_s"] = total
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
    write_markdown(out_dir / "RESULTS.md", out)
    print((out_dir / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
