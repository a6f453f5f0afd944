"""A run killed with SIGKILL after a checkpoint, then resumed, against the same run uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# One thread: on the shared 2-vCPU machine a second OpenMP thread sometimes computed exp() 1 ulp
# differently (see test_reliability.py); that is the machine, not the resume logic.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TRAIN = [sys.executable, "-m", "finetune.cli", "train"]


def killed_and_resumed_equal_uninterrupted(reference_cfg: Path, cfg: Path, run: Path, kill_after: str) -> list[dict]:
    """Runs `reference_cfg` whole; runs `cfg` (same but output_dir `run`), SIGKILLs it once
    `run/checkpoints/kill_after` exists, resumes it; asserts the final adapters and the logged
    metrics (but timings) are identical. Returns the resumed run's metrics rows."""
    subprocess.run(TRAIN + [str(reference_cfg)], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(TRAIN + [str(cfg)], env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (run / "checkpoints" / kill_after).exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists(), "the run finished before it was killed"
    subprocess.run(TRAIN + [str(cfg), "--resume"], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
    ref_run = Path(yaml.safe_load(reference_cfg.read_text())["output_dir"])
    a = load_file(str(ref_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{ref_run} and {run}: adapters differ"
    ra = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]
    return rb
