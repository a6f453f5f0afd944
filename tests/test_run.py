"""finetune.run: one reader of run directories and adapters. An rsLoRA adapter means the same thing
to chat/generate, to the merged export and to transformers + PEFT; the trainer takes a `Config`,
writes the GGUF a config asks for, and leaves no global state behind."""

import json
import os

import pytest
import torch
import yaml

import model as modellib
from finetune import config as cfglib
from finetune.export import export
from finetune.generate import load_for_inference
from finetune.run import RunDir, RunError, attach_adapter, read_adapter, save_adapter
from finetune.trainer import train

from test_train import QUICK_TRAIN

IDS = torch.randint(0, 200000, (2, 24), generator=torch.Generator().manual_seed(5))
TARGETS = ("attention", "experts", "router")


def _rslora_run(tmp_path, base):
    m = modellib.from_pretrained(base, dtype=torch.float32)
    modellib.add_lora(m, r=4, alpha=8, targets=TARGETS, use_rslora=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    run = RunDir(tmp_path / "run")
    run.start(cfglib.from_dict({
        "model": {"path": str(base)}, "data": {"train": str(QUICK_TRAIN), "format": "messages"},
        "lora": {"r": 4, "alpha": 8, "targets": list(TARGETS), "use_rslora": True}, "output_dir": str(run.path)}))
    save_adapter(m, run.adapter, base_model=str(base))
    with torch.no_grad():
        return run, m(IDS).logits


def test_rslora_adapter_means_the_same_to_chat_export_and_peft(tmp_path, tiny_hf):
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config

    run, trained = _rslora_run(tmp_path, tiny_hf)
    adapter = read_adapter(run.adapter)
    assert adapter.config["use_rslora"] is True and adapter.settings.scaling == 8 / 2  # alpha / sqrt(r)
    with torch.no_grad():
        chat = load_for_inference(str(run.path), device="cpu")(IDS).logits  # what `gptoss-ft chat RUN` runs
        merged = modellib.from_pretrained(export(run.path, "merged", tmp_path / "merged").path,
                                          dtype=torch.float32, experts="dequantized")(IDS).logits
        ref = GptOssForCausalLM.from_pretrained(tiny_hf, quantization_config=Mxfp4Config(dequantize=True),
                                                dtype=torch.float32)
        peft = PeftModel.from_pretrained(ref, str(run.adapter)).eval()(IDS).logits
        plain = modellib.from_pretrained(tiny_hf, dtype=torch.float32)(IDS).logits
    torch.testing.assert_close(chat, trained, rtol=0, atol=1e-5)
    assert (peft - trained).norm() < 2e-4 * trained.norm()
    # The merged export is bf16: its rounding can flip a near-tie in a router's top-4, which moves
    # that token's logits a lot; the mean gap stays a small part of what the adapter moved.
    assert (merged - trained).abs().mean() < 0.05 * (plain - trained).abs().mean()
    # chat used to apply alpha / r to every adapter: half of this adapter's scale
    half = load_for_inference(str(tiny_hf), device="cpu")
    attach_adapter(half, run.adapter)
    for m in half.modules():
        if hasattr(m, "scaling"):
            m.scaling /= 2
    for layer in half.model.layers:
        layer.mlp.experts.lora_scaling /= 2
    with torch.no_grad():
        assert (half(IDS).logits - trained).abs().mean() > 0.2 * (plain - trained).abs().mean()


def test_attach_adapter_restores_settings_and_refuses_a_second_one(tmp_path, tiny_hf):
    run, _ = _rslora_run(tmp_path, tiny_hf)
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
    s = attach_adapter(m, run.adapter)
    assert m.lora_settings == s and s.use_rslora and s.targets == TARGETS and s.r == 4
    with pytest.raises(ValueError, match="already carries"):
        attach_adapter(m, run.adapter)


def test_run_dir_errors_name_the_directory(tmp_path):
    with pytest.raises(RunError, match="no config.yaml"):
        RunDir(tmp_path).config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "x"}, "data": {"train": "y"},
                                                          "output_dir": str(tmp_path), "lora": {"rank": 4}}))
    with pytest.raises(RunError, match="config.yaml: unknown config key lora.rank"):
        RunDir(tmp_path).config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "x"}, "data": {"train": "y"},
                                                          "output_dir": str(tmp_path)}))
    with pytest.raises(RunError, match="no adapter/"):
        RunDir(tmp_path).trained_weights()


def test_train_takes_a_config_writes_gguf_and_leaves_no_global_state(tmp_path, tiny_hf, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    torch.use_deterministic_algorithms(False)
    cfg = cfglib.from_dict({
        "model": {"path": str(tiny_hf)}, "data": {"train": str(QUICK_TRAIN), "format": "messages", "max_seq_len": 256},
        "lora": {"r": 2, "alpha": 4, "targets": ["attention"]}, "train": {"max_steps": 1, "batch_size": 2},
        "wandb": {"enabled": True, "mode": "offline"}, "export": {"formats": ["gguf"]},
        "output_dir": str(tmp_path / "run")})
    run = RunDir(train(cfg))
    assert run.path == tmp_path / "run" and run.config == cfg
    path = run.export("gguf")
    assert path.is_file() and (path.parent / "Modelfile").is_file()
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"token_embd.weight", "blk.1.ffn_down_exps.weight"} <= names
    assert "WANDB_MODE" not in os.environ  # wandb got its mode as an argument
    assert not torch.are_deterministic_algorithms_enabled()  # the CPU run's setting was undone
    assert json.loads(run.summary.read_text())["steps"] == 1
