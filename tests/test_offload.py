"""Frozen weights kept in CPU memory when the model moves to an accelerator (model.offload_*).

No GPU here: moving to the `meta` device stands in for the accelerator (every tensor that moves
becomes meta; what stays is still a real CPU tensor), and the numerics are checked on CPU, where the
offloaded path (copy-on-use, `_decode_on`) runs the same code as on a GPU.
"""

import pytest
import torch

import model
from finetune import config as cfglib
from model.lora import add_lora


def _frozen(path):
    m = model.from_pretrained(path, dtype=torch.float32, experts="mxfp4")
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_offloaded_tensors_stay_on_cpu_when_the_model_moves(tiny_hf):
    m = _frozen(tiny_hf)
    names = list(m.state_dict())
    assert m.offload(embeddings=True, expert_layers=1) == [0]
    m.to("meta")
    sd = m.state_dict()
    assert list(sd) == names  # offloaded tensors are still the model's, under the same names
    assert sd["model.embed_tokens.weight"].device.type == "cpu"
    for part in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
        assert sd[f"model.layers.0.mlp.experts.{part}"].device.type == "cpu"
        assert sd[f"model.layers.1.mlp.experts.{part}"].device.type == "meta"
    assert sd["lm_head.weight"].device.type == "meta"
    assert sd["model.layers.0.mlp.experts.gate_up_proj_bias"].device.type == "meta"


def test_offloaded_layers_are_spread_over_the_depth(tiny_hf):
    m = _frozen(tiny_hf)
    cfg = m.config.replace(num_hidden_layers=24)
    big = model.GptOssForCausalLM(cfg, experts="mxfp4")
    assert big.offload(expert_layers=8) == [0, 3, 6, 9, 12, 15, 18, 21]
    with pytest.raises(ValueError, match="between 0 and 2"):
        m.offload(expert_layers=3)


def test_offloading_changes_no_number(tiny_hf):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    results = []
    for offload in (False, True):
        m = _frozen(tiny_hf)
        torch.manual_seed(1)
        add_lora(m, r=4, alpha=8, targets=("attention", "experts"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)  # a non-zero update, so the LoRA path through offloaded experts counts
        if offload:
            m.offload(embeddings=True, expert_layers=2)
        m.gradient_checkpointing_enable()
        out = m(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        assert torch.equal(g, results[1][1][n]), n


def test_trained_or_dense_weights_cannot_be_offloaded(tiny_hf):
    m = model.from_pretrained(tiny_hf, dtype=torch.float32, experts="dequantized")
    with pytest.raises(ValueError, match="trained embedding"):
        m.offload(embeddings=True)
    with pytest.raises(ValueError, match="only frozen MXFP4"):
        m.offload(expert_layers=1)


def test_config_refuses_offloading_experts_that_are_trained(tmp_path):
    base = {"model": {"path": "x", "init_preset": "tiny", "offload_experts": 2},
            "data": {"train": "recipes/data/quickstart_train.jsonl"}, "method": "full", "output_dir": str(tmp_path)}
    with pytest.raises(cfglib.ConfigError, match="offload_experts"):
        cfglib.from_dict(dict(base, model=dict(base["model"], experts="dequantized")))
    with pytest.raises(cfglib.ConfigError, match="at least 0"):
        cfglib.from_dict(dict(base, method="lora", model=dict(base["model"], offload_experts=-1)))
    assert cfglib.from_dict(dict(base, method="lora")).model.offload_experts == 2
    auto = dict(base, model=dict(base["model"], offload_experts="auto", experts="dequantized"))
    assert cfglib.from_dict(auto).model.offload_experts == "auto"  # auto offloads nothing it cannot
    with pytest.raises(cfglib.ConfigError, match="offload_experts"):
        cfglib.from_dict(dict(base, method="lora", model=dict(base["model"], offload_experts="some")))
