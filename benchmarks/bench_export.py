"""Export peak memory against model size: `gptoss-ft export RUN --format merged|mxfp4` on a LoRA run
of a scaled gpt-oss, against transformers + PEFT merging the same adapter (`merge_and_unload` +
`save_pretrained`, the usual way to get a merged model).

    python -m benchmarks.bench_export [--quick] [--json PATH]

Each export runs in a fresh child process whose peak resident set (ru_maxrss) is read by a small
parent that does nothing else, so no other work is counted. Model size = the merged bf16
checkpoint our export writes (what the peer must hold as well). Only memory is measured, so the
MXFP4 export (GPTQ: a column-by-column loop that keeps about one core busy) runs while the two
merged exports run one after the other beside it; a process's own peak does not depend on what
else runs, and the row costs the MXFP4 export's time instead of the sum of all three.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train_step import QUICK_SHAPE, SHAPE

_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if _VOCAB.is_dir():  # offline runs: GPTQ calibration tokenizes the run's training data
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))
_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "quickstart_train.jsonl"


def make_run(root: Path, quick: bool) -> tuple[Path, Path]:
    """A base checkpoint and a run directory with a nonzero attention + experts adapter."""
    import yaml

    from finetune.run import save_adapter
    from model import from_pretrained
    from model.checkpoint import write_random
    from model.config import MXFP4_QUANTIZATION_CONFIG, GptOssConfig
    from model.lora import add_lora

    shape = dict(QUICK_SHAPE, num_hidden_layers=1) if quick else SHAPE
    base = write_random(root / "base", GptOssConfig(**shape,
                                                    quantization_config=MXFP4_QUANTIZATION_CONFIG), seed=0)
    m = from_pretrained(base, dtype=torch.float32)
    add_lora(m, r=16, alpha=32, targets=("attention", "experts"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".lora_B." in name:  # a trained adapter changes every targeted weight
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    run = root / "run"
    save_adapter(m, run / "adapter", base_model=str(base))
    cfg = {"model": {"path": str(base), "experts": "mxfp4"},
           "data": {"train": str(_DATA), "format": "messages", "max_seq_len": 256},
           "method": "lora", "lora": {"r": 16, "alpha": 32, "targets": ["attention", "experts"]},
           "train": {"max_steps": 1}, "output_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, base


_PEER = """
import sys, torch
from peft import PeftModel
from transformers import GptOssForCausalLM, Mxfp4Config
base, adapter, out = sys.argv[1:4]
m = GptOssForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
"""

_MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)  # stderr passes through
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def start_peak_rss(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` under a measuring parent; `finish_peak_rss` waits and returns its peak RSS in bytes."""
    # stderr to a file, not a pipe: nobody reads a pipe while another export runs, and a full one blocks
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=err,
                            text=True, start_new_session=True)  # own process group: see `main`
    proc.err_file = err
    return proc


def finish_peak_rss(proc: subprocess.Popen) -> int:
    out, _ = proc.communicate()
    with proc.err_file as err:
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(proc.args[3:9])} failed:\n{err.read()[-3000:]}")
    return int(out.strip().splitlines()[-1])


def peak_rss(cmd: list[str]) -> int:
    return finish_peak_rss(start_peak_rss(cmd))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 layer instead of 4")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        run, base = make_run(root, args.quick)
        make_run_s = time.perf_counter() - t0
        cli = [sys.executable, "-m", "finetune.cli", "export", str(run), "--out"]
        res = {"num_hidden_layers": 1 if args.quick else SHAPE["num_hidden_layers"], "base_bytes": dir_bytes(base),
               "make_run_s": make_run_s}
        t0 = time.perf_counter()
        mx = start_peak_rss([*cli, str(root / "mx"), "--format", "mxfp4"])
        try:
            res["ours_merged_peak"] = peak_rss([*cli, str(root / "merged"), "--format", "merged"])
            res["peer_merged_peak"] = peak_rss([sys.executable, "-c", _PEER, str(base), str(run / "adapter"),
                                                str(root / "peer")])
            res["merged_exports_s"] = time.perf_counter() - t0
            res["ours_mxfp4_peak"] = finish_peak_rss(mx)
            res["mxfp4_export_s"] = time.perf_counter() - t0
        finally:
            if mx.poll() is None:  # a merged export failed: stop the MXFP4 export and its parent
                os.killpg(mx.pid, signal.SIGKILL)
                mx.wait()
        res["merged_bytes"] = dir_bytes(root / "merged")
        res["mxfp4_bytes"] = dir_bytes(root / "mx")
        res["peer_merged_bytes"] = dir_bytes(root / "peer")
    res["memory_ratio"] = res["ours_merged_peak"] / res["peer_merged_peak"]
    gib = 2 ** 30
    print(f"export of a LoRA run ({res['num_hidden_layers']} layer(s), H=512, E=32, V=201088): merged bf16 model "
          f"{res['merged_bytes'] / gib:.2f} GiB, MXFP4 base {res['base_bytes'] / gib:.2f} GiB")
    print(f"  ours merged  peak RSS {res['ours_merged_peak'] / gib:.2f} GiB "
          f"({res['ours_merged_peak'] / res['merged_bytes']:.2f}x the merged model)")
    print(f"  ours mxfp4   peak RSS {res['ours_mxfp4_peak'] / gib:.2f} GiB (GPTQ requantization, calibration included)")
    print(f"  peer merged  peak RSS {res['peer_merged_peak'] / gib:.2f} GiB "
          f"({res['peer_merged_peak'] / res['merged_bytes']:.2f}x)  -> ours/peer {res['memory_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
