"""Soak test for crash safety (kept out of the test run): kill `gptoss-ft train` with SIGKILL at random
moments, resume, and check the final adapter is bit-identical to an uninterrupted run's.

    python scripts/soak_resume.py [--cycles 20] [--seed 0] [--workdir DIR] [--threads 1] [--processes N]

Each cycle starts a fresh run, kills it 1-3 times at random delays (start-up, mid-step, mid-save all
get hit over enough cycles), resumes until it finishes, and compares. Prints how many ended identical.
--processes N (2 or more): every run is `accelerate launch --config_file configs/accelerate/fsdp2.yaml
--num_processes N`, sharded checkpoints and all; the launcher is SIGKILLed and its workers must die
with it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from resume_check import kill, launch  # noqa: E402  (the kill/resume helpers the tests use)

TRAIN = [sys.executable, "-m", "finetune.cli", "train"]


# One thread per run by default: on a shared VM a process's second OpenMP thread has been seen
# computing elementwise ops 1 ulp differently (see tests/test_reliability.py), which would count
# against the resume logic. --threads 0 keeps torch's default.
ENV = dict(os.environ)


def run(cfg: Path, resume: bool, kill_after: float | None) -> bool:
    """True when the run finished; False when it was killed."""
    cmd = TRAIN + [str(cfg)] + (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    if kill_after is None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{err[-2000:]}")
        return True
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode == 0
    except subprocess.TimeoutExpired:
        kill(proc)
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    ap.add_argument("--processes", type=int, default=1, help="2 or more: FSDP2 on that many CPU processes")
    args = ap.parse_args()
    if args.processes > 1:
        TRAIN[:] = launch(args.processes)
    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptoss-soak-"))
    base = work / "base"
    if not base.exists():
        subprocess.run([sys.executable, "-m", "finetune.cli", "init", "--out", str(base)], check=True)

    def config(out: Path) -> Path:
        cfg = {"model": {"path": str(base)},
               "data": {"train": str(ROOT / "recipes" / "data" / "quickstart_eval.jsonl"), "format": "messages",
                        "max_seq_len": 256},
               "lora": {"r": 4, "alpha": 8, "targets": ["attention", "experts"]},
               "train": {"max_steps": 10, "batch_size": 2, "grad_accum": 2, "save_every": 1, "lr": 1e-2},
               "output_dir": str(out)}
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    t0 = time.time()
    run(config(work / "ref"), False, None)
    ref_time = time.time() - t0
    ref = load_file(str(work / "ref" / "adapter" / "adapter_model.safetensors"))
    identical = 0
    for cycle in range(args.cycles):
        out = work / f"cycle-{cycle}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = config(out)
        kills = rng.randint(1, 3)
        for _ in range(kills):
            if run(cfg, True, rng.uniform(0.5, ref_time)):
                break
        while not (out / "adapter").exists():
            run(cfg, True, None)
        got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        identical += same
        print(f"cycle {cycle + 1}: {kills} kill(s) -> {'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"{identical}/{args.cycles} kill/resume cycles ended identical to the uninterrupted run")
    sys.exit(0 if identical == args.cycles else 1)


if __name__ == "__main__":
    main()
