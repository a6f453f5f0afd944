"""FSDP2 executed, not only configured (issue 18): `accelerate launch --config_file
configs/accelerate/fsdp2.yaml --num_processes N gptoss-ft train` on CPU processes over gloo runs
accelerate's FSDP2 code (one unit per decoder layer) exactly as on GPUs. DeepSpeed ZeRO-3 runs on CPU
processes too (its CPU accelerator over gloo): the same loss and weight checks, in a slow test.

Oracles: the same run on one process with the same global batch (losses to 1e-5 relative, final
weights to 1e-3 of each tensor's largest value: float sums in another order, amplified by AdamW's
division by sqrt(v)); `gptoss-ft plan` for the per-process share; the uninterrupted run for
kill/resume (bit-identical). Default run: one 2-process LoRA run (~20 s); the rest is `-m slow`.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from resume_check import ONE_THREAD, kill, killed_and_resumed_equal_uninterrupted, launch, start
from safetensors.torch import load_file
from test_train import small_data, write_config  # noqa: F401 (small_data is a fixture)

from finetune import plan as planlib
from finetune import state as statelib
from finetune.cli import main

LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-3


def _config(where: Path, base, data, *, batch_size: int, method: str = "lora", **train) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    extra = {"method": "full", "model": {"experts": "dequantized"}} if method == "full" else {}
    return write_config(where, base, data, **extra, train={
        "max_steps": 5, "batch_size": batch_size, "save_every": 2, "eval_every": 5, **train})


def _launched(cfg: Path, processes: int, *extra: str, config_file: str = "fsdp2.yaml",
              ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch(processes, config_file) + [str(cfg), *extra], capture_output=True, text=True,
                          timeout=900, env=ONE_THREAD)
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return proc


def _run(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"])


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, weights: str) -> None:
    """Equal losses (train and eval) and equal final weights, to the stated tolerances."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "eval_loss"):
            if k in x:
                assert abs(x[k] - y[k]) <= LOSS_RTOL * abs(x[k]), (k, x, y)
    wa, wb = load_file(str(a / weights)), load_file(str(b / weights))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= WEIGHT_TOL * wa[k].abs().max(), k


def _held(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["held_bytes_per_process"]


def _assert_sharded(one: list[dict], many: list[dict], cfg: Path) -> None:
    """Each of N processes holds about 1/N of the trainable parameters, gradients and optimizer state
    of the one-process run (FSDP2 splits rows: a few tensors split unevenly), and `gptoss-ft plan
    --gpus N --device cpu` predicts each process's share within 20%."""
    n = len(many)
    for k in ("trainable", "gradients", "optimizer", "frozen"):
        for h in many:  # (full fine-tuning has no frozen weights)
            assert abs(h[k] * n - one[0][k]) <= 0.05 * one[0][k], (k, h[k], one[0][k])
    b = planlib.plan_run(config=str(cfg), gpus=n, device="cpu").breakdown
    planned = {"weights": sum(v for k, v in b.items() if k.startswith(("weights:", "trainable:")) and "MXFP4" not in k),
               "gradients": b["gradients"], "optimizer": b["optimizer: AdamW m and v"]}
    for h in many:
        measured = {"weights": h["trainable"] + h["frozen"], "gradients": h["gradients"], "optimizer": h["optimizer"]}
        for k in planned:
            assert abs(planned[k] / measured[k] - 1) <= 0.20, (k, planned[k], measured[k])


def test_fsdp2_lora_on_two_cpu_processes_equals_one_process(tmp_path, tiny_hf, small_data):
    one = _config(tmp_path / "one", tiny_hf, small_data, batch_size=2)
    two = _config(tmp_path / "two", tiny_hf, small_data, batch_size=1)  # 2 x 1 rows: the same global batch
    assert main(["train", str(one)]) == 0
    out = _launched(two, 2)
    assert out.stdout.startswith("FSDP2, 2 processes, gloo"), out.stdout[:300]
    _assert_same_run(_run(one), _run(two), "adapter/adapter_model.safetensors")
    _assert_sharded(_held(_run(one)), _held(_run(two)), two)
    # Each process wrote its own shard; the 2-process checkpoint resumes on 1 process (batch 2 x 1).
    ckpt = _run(two) / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.glob("shard-*")) == ["shard-00000-of-00002.safetensors",
                                                           "shard-00001-of-00002.safetensors"]
    resumed = _config(tmp_path / "resumed", tiny_hf, small_data, batch_size=2)
    shutil.copytree(_run(two), _run(resumed))
    shutil.rmtree(_run(resumed) / "checkpoints" / "step-5")
    shutil.rmtree(_run(resumed) / "adapter")
    assert main(["train", str(resumed), "train.batch_size=1", "--resume"]) == 2  # another global batch: refused
    assert main(["train", str(resumed), "--resume"]) == 0
    _assert_same_run(_run(two), _run(resumed), "adapter/adapter_model.safetensors")


def test_cpu_flag_with_several_processes_is_refused(tmp_path, tiny_hf, small_data):
    """`accelerate launch --cpu --num_processes 2` starts one process: it must not train alone."""
    cfg = _config(tmp_path, tiny_hf, small_data, batch_size=1)
    cmd = launch(2, "ddp.yaml")
    cmd.insert(cmd.index("--num_processes"), "--cpu")
    proc = subprocess.run(cmd + [str(cfg)], capture_output=True, text=True, timeout=300)
    # gptoss-ft exits 2 with one line; accelerate's launcher then reports the failed command
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "gptoss-ft train: error: accelerate launch --cpu" in proc.stderr, proc.stderr[-2000:]
    assert "started this one alone" in proc.stderr and "drop --cpu" in proc.stderr
    assert not (_run(cfg) / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fsdp2_full_finetune_on_two_cpu_processes_equals_one_process(tmp_path, tiny_hf, small_data):
    one = _config(tmp_path / "one", tiny_hf, small_data, batch_size=2, method="full", lr=1e-3)
    two = _config(tmp_path / "two", tiny_hf, small_data, batch_size=1, method="full", lr=1e-3)
    assert main(["train", str(one)]) == 0
    _launched(two, 2)
    _assert_same_run(_run(one), _run(two), "model/model.safetensors")
    _assert_sharded(_held(_run(one)), _held(_run(two)), two)


@pytest.mark.slow
def test_fsdp2_on_four_processes_and_a_two_process_checkpoint_resumed_on_four(tmp_path, tiny_hf, small_data):
    """4 processes x 1 row = 1 process x 4 rows; a checkpoint of 2 processes x 2 rows resumes on 4 x 1."""
    one = _config(tmp_path / "one", tiny_hf, small_data, batch_size=4)
    four = _config(tmp_path / "four", tiny_hf, small_data, batch_size=1)
    two = _config(tmp_path / "two", tiny_hf, small_data, batch_size=2)
    assert main(["train", str(one)]) == 0
    _launched(four, 4)
    _assert_same_run(_run(one), _run(four), "adapter/adapter_model.safetensors")
    _assert_sharded(_held(_run(one)), _held(_run(four)), four)
    _launched(two, 2, "train.max_steps=2", "train.eval_every=null")  # (else it evaluates at its last step, 2)
    resumed = _config(tmp_path / "resumed", tiny_hf, small_data, batch_size=1)
    shutil.copytree(_run(two), _run(resumed))
    shutil.rmtree(_run(resumed) / "adapter")
    _launched(resumed, 4, "--resume")
    _assert_same_run(_run(one), _run(resumed), "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_resume_equal_an_uninterrupted_fsdp2_run(tmp_path, tiny_hf, small_data):
    """Killed after step 2 is saved, resumed: bit-identical to the uninterrupted FSDP2 run. Then killed
    while the processes write a checkpoint's shards: the previous checkpoint is the one resumed."""
    train = launch(2)
    ref = _config(tmp_path / "ref", tiny_hf, small_data, batch_size=1, max_steps=8, save_every=1)
    cfg = _config(tmp_path / "killed", tiny_hf, small_data, batch_size=1, max_steps=8, save_every=1)
    killed_and_resumed_equal_uninterrupted(ref, cfg, _run(cfg), "step-2", train=train)

    shutil.rmtree(_run(cfg))
    ckpts = _run(cfg) / "checkpoints"
    hit = None
    for step in range(2, 8):  # poll for a save in progress; the window is a few milliseconds
        proc = start(train + [str(cfg), "--resume"])
        while proc.poll() is None and not (ckpts / f".step-{step}.partial").exists():
            time.sleep(0.001)
        kill(proc)
        if not (ckpts / f"step-{step}").exists():
            hit = step
            break
    assert hit is not None, "no kill landed inside a save"
    assert statelib.latest_checkpoint(ckpts) == ckpts / f"step-{hit - 1}"
    subprocess.run(train + [str(cfg), "--resume"], check=True, env=ONE_THREAD, capture_output=True)
    a = load_file(str(_run(ref) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(_run(cfg) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_deepspeed_zero3_lora_on_two_cpu_processes_equals_one_process(tmp_path, tiny_hf, small_data):
    """configs/accelerate/deepspeed_zero3.yaml on 2 CPU processes: the losses and adapter of one process;
    each holds half of the parameters (ZeRO-3 partitions) and of the AdamW state. DeepSpeed frees the
    gradient partitions inside its step, so none are held when the trainer measures. What it does not
    support is refused: checkpoints (ZeRO's own optimizer layout) and evaluation during training."""
    pytest.importorskip("deepspeed")
    no = {"save_every": None, "eval_every": None}
    one = _config(tmp_path / "one", tiny_hf, small_data, batch_size=2, **no)
    two = _config(tmp_path / "two", tiny_hf, small_data, batch_size=1, **no)
    assert main(["train", str(one)]) == 0
    out = _launched(two, 2, config_file="deepspeed_zero3.yaml")
    lines = out.stdout.splitlines()  # DeepSpeed logs a few lines of its own as it starts
    assert any(x.startswith("DeepSpeed ZeRO-3, 2 processes, gloo") for x in lines[:lines.index("model:")]), lines[:9]
    _assert_same_run(_run(one), _run(two), "adapter/adapter_model.safetensors")
    whole, halves = _held(_run(one))[0], _held(_run(two))
    for k in ("trainable", "optimizer", "frozen"):
        assert all(abs(2 * h[k] - whole[k]) <= 0.05 * whole[k] for h in halves), (k, whole, halves)
    for key in ("eval_every", "save_every"):
        refused = _launched(two, 2, f"train.{key}=2", config_file="deepspeed_zero3.yaml", ok=False)
        assert f"train.{key} is not supported with DeepSpeed" in refused.stderr
