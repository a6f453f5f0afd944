"""A run killed with SIGKILL after a checkpoint, then resumed, against the same run uninterrupted; on one
process or under `accelerate launch` (`launch`: FSDP2 on CPU processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file

# One thread: on the shared 2-vCPU machine a second OpenMP thread sometimes computed exp() 1 ulp
# differently (see test_reliability.py); that is the machine, not the resume logic.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TRAIN = [sys.executable, "-m", "finetune.cli", "train"]
ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int, config_file: str = "fsdp2.yaml") -> list[str]:
    """`accelerate launch --config_file configs/accelerate/FILE --num_processes N gptoss-ft train`, on
    a free port (other launches may be running on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / config_file), "--num_processes", str(processes),
            "--main_process_port", str(port), "-m", "finetune.cli", "train"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's first process, as `kill -9 PID` does, and wait until every process it started is
    gone: torchrun's workers live in sessions of their own, so they must die with it, not train on."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it had finished
        workers = []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"processes {[p.pid for p in alive]} outlived the killed launcher"


def killed_and_resumed_equal_uninterrupted(reference_cfg: Path, cfg: Path, run: Path, kill_after: str,
                                           train: list[str] = TRAIN) -> list[dict]:
    """Runs `reference_cfg` whole; runs `cfg` (same but output_dir `run`), SIGKILLs it once
    `run/checkpoints/kill_after` exists, resumes it; asserts the final adapters and the logged
    metrics (but timings) are identical. `train`: the command that trains (one process, or
    `launch(N)`). Returns the resumed run's metrics rows."""
    subprocess.run(train + [str(reference_cfg)], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
    proc = start(train + [str(cfg)])
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (run / "checkpoints" / kill_after).exists():
        time.sleep(0.02)
    kill(proc)
    assert not (run / "adapter").exists(), "the run finished before it was killed"
    subprocess.run(train + [str(cfg), "--resume"], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
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
