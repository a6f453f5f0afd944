"""The full-size gpt-oss-20b end to end on this machine, with random weights: write the checkpoint,
LoRA-train it, export every format, load the MXFP4 export back and check it. Kept out of the test
run (about 2 hours on 2 cores for gpt-oss-20b); `tests/test_full_size_script.py` (`-m slow`) runs
the same script on the tiny preset.

    python scripts/full_size.py --work DIR [--preset gpt-oss-20b] [--steps 3] [--only STEP ...]

Steps, each the user's command in its own process (`python -m finetune.cli ...`), with wall time
and peak memory sampled from /proc (RssAnon: the process's own memory; VmRSS adds the pages of
memory-mapped checkpoint files, which the kernel can drop and reread):

  init      gptoss-ft init --preset P --out WORK/base (skipped when WORK/base exists)
  train     gptoss-ft train WORK/train.yaml: LoRA r 16 on attention and experts, experts frozen in
            MXFP4, bf16 weights, gradient checkpointing, sequence 512, batch 1; and the planner's
            peak (`gptoss-ft plan --config WORK/train.yaml --device cpu`) next to it
  adapter   gptoss-ft export WORK/run --format adapter
  merged    gptoss-ft export WORK/run --format merged (bf16); layer L's tensors are kept in
            WORK/merged-layer.safetensors and the export is deleted unless --keep (gpt-oss-20b's
            is 39 GiB)
  mxfp4     gptoss-ft export WORK/run --format mxfp4 (GPTQ on every changed expert)
  gguf      gptoss-ft export WORK/export-mxfp4 --format gguf (the MXFP4 export to one GGUF file:
            bytes repacked, no requantization; `--gguf-from-run` exports the run instead, which
            requantizes again as mxfp4 does)
  check     the MXFP4 export loads with `model.from_pretrained` and greedily generates; its layer L
            matches the merged export's: non-expert tensors equal, every expert weight within
            MXFP4's rounding error (at most 1.5 units of its block's scale, 0.25 on average)

Every step appends to WORK/report.json; the end prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("init", "train", "adapter", "merged", "mxfp4", "gguf", "check")
GIB = 2 ** 30


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measured(name: str, argv: list[str], work: Path, log: Path) -> dict:
    """Run `argv`, sampling its memory every 0.2 s; return wall seconds and peaks. A failing step stops
    the script with its log's tail."""
    peaks = {"VmRSS": 0, "RssAnon": 0}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                for key, value in _proc_status(proc.pid).items():
                    if key in peaks:
                        peaks[key] = max(peaks[key], value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}):\n" + "".join(log.read_text().splitlines(keepends=True)[-30:]))
    result = {"step": name, "command": " ".join(argv[2:] if argv[1:2] == ["-m"] else argv), "wall_s": round(wall, 1),
              "peak_rss_gib": round(peaks["VmRSS"] / GIB, 2), "peak_anon_gib": round(peaks["RssAnon"] / GIB, 2)}
    report = work / "report.json"
    rows = json.loads(report.read_text()) if report.exists() else []
    rows = [r for r in rows if r["step"] != name] + [result]
    report.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{name}: {wall:.0f} s, peak RSS {result['peak_rss_gib']} GiB (anonymous {result['peak_anon_gib']} GiB)",
          flush=True)
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *args]


def train_config(work: Path, steps: int, seq: int) -> Path:
    cfg = {"model": {"path": str(work / "base"), "experts": "mxfp4", "dtype": "bfloat16",
                     "gradient_checkpointing": True},
           "data": {"train": str(ROOT / "recipes/data/quickstart_train.jsonl"), "format": "messages",
                    "max_seq_len": seq, "packing": True},
           "method": "lora", "lora": {"r": 16, "alpha": 32, "targets": ["attention", "experts"]},
           "train": {"max_steps": steps, "batch_size": 1, "grad_accum": 1, "lr": 1.0e-4, "log_every": 1,
                     "save_every": 1000, "eval_every": 1000, "warmup_steps": 0},
           "output_dir": str(work / "run")}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def check(work: Path, layer: int, new_tokens: int) -> None:
    """The `check` step, run in its own process (`--check-only`)."""
    import torch
    from safetensors import safe_open

    from finetune.generate import chat_prompt, generate
    from model import mxfp4
    from model.checkpoint import Checkpoint
    from model.modeling import from_pretrained

    out = work / "export-mxfp4"
    model = from_pretrained(str(out), dtype=torch.bfloat16, experts="mxfp4")
    start = time.perf_counter()
    tokens = generate(model, chat_prompt([{"role": "user", "content": "What is 2 + 2?"}]), max_new_tokens=new_tokens)
    gen_s = time.perf_counter() - start
    del model
    ck = Checkpoint(out)
    prefix = f"model.layers.{layer}."
    result = {"layer": layer, "generated": tokens, "generate_s_per_token": round(gen_s / new_tokens, 2)}
    with safe_open(str(work / "merged-layer.safetensors"), "pt") as merged:
        for name in merged.keys():
            if not name.endswith(("gate_up_proj", "down_proj")):
                if not torch.equal(merged.get_tensor(name), ck.get(name, torch.bfloat16)):
                    sys.exit(f"check: {name} differs between the merged and the MXFP4 export")
                continue
            proj = name.rsplit(".", 1)[1]
            dense = merged.get_tensor(name).float().transpose(1, 2)  # [E, out, in]
            scales = ck.get(name + "_scales")
            exported = mxfp4.dequantize(ck.get(name + "_blocks"), scales, torch.float32)
            # The error in units of each block's scale (the E2M1 grid is 0.5 to 2 units apart):
            # rounding to nearest stays within 1, GPTQ's propagated errors about so; a wrong
            # tensor (another expert, a transposition, lost LoRA) is off by whole weights, several units.
            unit = torch.exp2(scales.float() - mxfp4.SCALE_BIAS).repeat_interleave(mxfp4.BLOCK, -1)
            units = (exported - dense).abs() / unit
            result[proj] = {"max_error_units": round(units.max().item(), 3), "mean_error_units": round(units.mean().item(), 4),
                            "relative_error": round(((exported - dense).norm() / dense.norm()).item(), 4)}
            if units.max() > 1.5 or units.mean() > 0.25:
                sys.exit(f"check: {name}: the MXFP4 export is off the merged export by more than MXFP4 rounding: "
                         f"{result[proj]}")
    (work / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps to train")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layer", type=int, default=None, help="the layer the check compares (default: the middle one)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--only", nargs="+", choices=STEPS, default=STEPS)
    p.add_argument("--keep", action="store_true", help="keep the merged bf16 export")
    p.add_argument("--gguf-from-run", action="store_true")
    p.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from model.config import preset

    layers = preset(args.preset).num_hidden_layers
    layer = args.layer if args.layer is not None else layers // 2
    if args.check_only:
        check(work, layer, args.new_tokens)
        return 0
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    run = work / "run"
    if "init" in args.only and not (work / "base" / "config.json").exists():
        measured("init", cli("init", "--preset", args.preset, "--out", str(work / "base")), work, logs / "init.log")
    if "train" in args.only:
        cfg = train_config(work, args.steps, args.seq)
        plan = subprocess.run(cli("plan", "--config", str(cfg), "--device", "cpu", "--json"), cwd=ROOT,
                              capture_output=True, text=True, check=True)
        shutil.rmtree(run, ignore_errors=True)
        result = measured("train", cli("train", str(cfg)), work, logs / "train.log")
        planned = json.loads(plan.stdout)["peak_gib"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        extra = {"planned_gib": planned, "measured_over_planned": round(result["peak_anon_gib"] / planned, 3),
                 "s_per_step": round(result["wall_s"] / args.steps, 1), "losses": losses}
        _annotate(work, "train", extra)
    exports = {"adapter": ("adapter", str(run), work / "export-adapter"),
               "merged": ("merged", str(run), work / "export-merged"),
               "mxfp4": ("mxfp4", str(run), work / "export-mxfp4"),
               "gguf": ("gguf", str(run) if args.gguf_from_run else str(work / "export-mxfp4"), work / "model.gguf")}
    for step, (fmt, source, out) in exports.items():
        if step not in args.only:
            continue
        measured(step, cli("export", source, "--format", fmt, "--out", str(out)), work, logs / f"{step}.log")
        if step == "merged":
            _keep_layer(out, work / "merged-layer.safetensors", layer)
            if not args.keep:
                shutil.rmtree(out)
    if "check" in args.only:
        measured("check", [sys.executable, __file__, "--work", str(work), "--preset", args.preset, "--layer", str(layer),
                           "--new-tokens", str(args.new_tokens), "--check-only"], work, logs / "check.log")
        _annotate(work, "check", json.loads((work / "check.json").read_text()))
    print(table(json.loads((work / "report.json").read_text())))
    return 0


def _annotate(work: Path, step: str, extra: dict) -> None:
    report = work / "report.json"
    rows = json.loads(report.read_text())
    for r in rows:
        if r["step"] == step:
            r.update(extra)
    report.write_text(json.dumps(rows, indent=2) + "\n")


def _keep_layer(export: Path, dest: Path, layer: int) -> None:
    """Copy layer `layer`'s tensors of a checkpoint into one small safetensors file."""
    from safetensors.torch import save_file

    from model.checkpoint import Checkpoint

    ck = Checkpoint(export)
    prefix = f"model.layers.{layer}."
    save_file({n: ck.get(n) for n in ck.names() if n.startswith(prefix)}, str(dest))


def table(rows: list[dict]) -> str:
    lines = ["| step | wall | peak RSS GiB | of which anonymous GiB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['wall_s'] / 60:.1f} min | {r['peak_rss_gib']} | {r['peak_anon_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # The steps' processes share 2 cores with this one's sampler (and whatever else runs): OpenMP
    # threads that spin while waiting for a descheduled peer make small torch ops 100x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
