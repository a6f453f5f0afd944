"""`gptoss-ft train` end to end on a tiny model: outputs, PEFT-loadable adapters, full fine-tuning,
many processes, non-finite steps (kill-and-resume is in test_reliability.py). Oracles: transformers + PEFT."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "recipes" / "data" / "quickstart_train.jsonl"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    lines = QUICK_TRAIN.read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    return d


def write_config(tmp_path, base, data, **sections) -> Path:
    cfg = {
        "model": {"path": str(base), "experts": "mxfp4"},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "format": "messages",
                 "max_seq_len": 256, "packing": True},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "targets": ["attention", "experts"]},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "seed": 0, "save_every": 2,
                  "eval_every": 2, "warmup_steps": 1},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lora_run_writes_everything_and_peft_loads_the_adapter(tmp_path, tiny_hf, small_data):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    assert main(["train", str(write_config(tmp_path, tiny_hf, small_data))]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(r) and r["tokens_per_s"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["r"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # The oracle: PEFT puts our adapter on transformers' GptOss; logits equal ours with the adapter.
    import model as modellib
    from safetensors.torch import load_file

    ours = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="mxfp4")
    modellib.add_lora(ours, r=4, alpha=8, targets=("attention", "experts"))
    modellib.load_lora_state_dict(ours, load_file(str(run / "adapter" / "adapter_model.safetensors")))
    base = transformers.GptOssForCausalLM.from_pretrained(
        tiny_hf, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.randint(0, 200000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=2e-4, atol=2e-4), (a - b).abs().max()
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(input_ids=ids).logits, b, atol=1e-4), "the adapter learned nothing"


def test_a_resumed_run_reads_the_rendered_data_from_the_cache(tmp_path, tiny_hf, small_data, capsys):
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path, tiny_hf, small_data, train={"max_steps": 1, "save_every": 1, "eval_every": None})
    d = yaml.safe_load(cfg.read_text())
    d["data"]["cache_dir"] = str(cache)
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"cache: rendered into {cache}") == 2  # train and eval
    assert main(["train", str(cfg), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"cache: read from {cache}") == 2 and "rendered into" not in out


def test_full_finetune_writes_an_hf_model_transformers_loads(tmp_path, tiny_hf, small_data):
    transformers = pytest.importorskip("transformers")
    # Also exercised here: gradient checkpointing, the router balancing loss, wandb offline.
    cfg = write_config(tmp_path, tiny_hf, small_data, method="full",
                       model={"experts": "dequantized", "gradient_checkpointing": True},
                       train={"max_steps": 2, "save_every": None, "eval_every": None, "lr": 1e-3,
                              "aux_loss_coef": 0.01},
                       wandb={"enabled": True, "mode": "offline", "project": "gptoss-ft-test"})
    assert main(["train", str(cfg)]) == 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb wrote its offline run"
    out = tmp_path / "run" / "model"
    import model as modellib

    theirs = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="dequantized")
    tuned = modellib.from_pretrained(out, dtype=torch.float32, experts="dequantized")
    ids = torch.randint(0, 200000, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, theirs(input_ids=ids).logits, rtol=2e-4, atol=2e-4)
        assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-4)
    w0 = base.model.layers[0].mlp.experts.down_proj
    w1 = tuned.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(w0, w1), "experts were trained"


def _run(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_hf, small_data):
    cfg = write_config(tmp_path, tiny_hf, small_data,
                       train={"lr": 1e30, "max_grad_norm": None, "max_steps": 20, "max_bad_steps": 2,
                              "save_every": 1, "eval_every": None, "warmup_steps": 0, "schedule": "constant"})
    proc = _run(["train", str(cfg)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "non-finite steps in a row" in err and "Traceback" not in err
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert json.loads((last / "state.json").read_text())["step"] >= 1



def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tmp_path, tiny_hf, small_data):
    common = {"train": {"max_steps": 3, "save_every": None, "eval_every": None}}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_config(tmp_path / "one", tiny_hf, small_data, **common, **{})
    one_cfg = yaml.safe_load(one.read_text())
    one_cfg["train"]["batch_size"] = 2
    one.write_text(yaml.safe_dump(one_cfg))
    two = write_config(tmp_path / "two", tiny_hf, small_data, **common)
    two_cfg = yaml.safe_load(two.read_text())
    two_cfg["train"]["batch_size"] = 1
    two.write_text(yaml.safe_dump(two_cfg))
    assert main(["train", str(one)]) == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
                "-m", "finetune.cli", "train", str(two)]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


def test_evaluate_and_export_after_training_write_a_summary_and_a_plot(tmp_path, tiny_hf, small_data):
    cfg = write_config(tmp_path, tiny_hf, small_data,
                       train={"max_steps": 2, "save_every": None, "eval_every": 1},
                       evaluate={"generate": str(small_data / "eval.jsonl"), "limit": 3, "max_new_tokens": 6},
                       export={"formats": ["adapter", "mxfp4"]})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("base_accuracy", "tuned_accuracy", "mxfp4_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["steps"] == 2 and summary["eval_prompts"] == 3 and summary["final_eval_loss"] is not None
    assert (run / "export" / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "export" / "mxfp4" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bf16_weights_train_on_cpu(tmp_path, tiny_hf, small_data, capsys):
    """model.dtype: bfloat16 on CPU (how the full-size 20b fits 24 GiB): the fp32 LoRA adapters meet
    bf16 activations, so the run autocasts to bf16 as on a GPU (it failed with a dtype mismatch)."""
    cfg = write_config(tmp_path, tiny_hf, small_data, model={"path": str(tiny_hf), "experts": "mxfp4",
                                                             "dtype": "bfloat16"}, train={"eval_every": None})
    assert main(["train", str(cfg)]) == 0
    assert "precision bf16" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
