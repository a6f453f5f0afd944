"""LoRA: zero-init equals base, merged equals unmerged, exact trainable count, PEFT round trip."""

import json

import pytest
import torch
from safetensors.torch import save_file

import model
from model.lora import LoRALinear

IDS = torch.randint(0, 201088, (2, 24), generator=torch.Generator().manual_seed(0))
ALL = ("attention", "experts", "router")


def _load(path, experts="mxfp4"):
    return model.from_pretrained(path, dtype=torch.float32, experts=experts)


def _randomize_b(m, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.mark.parametrize("experts", ["mxfp4", "dequantized"])
def test_zero_init_equals_base_and_merge_equals_unmerged(tiny_hf, experts):
    m = _load(tiny_hf, experts)
    base = _logits(m)
    model.add_lora(m, r=4, alpha=8, targets=ALL)
    torch.testing.assert_close(_logits(m), base, rtol=0, atol=0)
    _randomize_b(m)
    adapted = _logits(m)
    assert (adapted - base).norm() > 1e-2 * base.norm()  # the adapters do something
    model.merge_lora(m)
    assert not any(".lora_" in n for n, _ in m.named_parameters())
    assert m.model.layers[0].mlp.experts.fmt == "dequantized"  # MXFP4 + LoRA merges into dense experts
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not isinstance(m.model.layers[0].self_attn.q_proj, LoRALinear)
    assert (_logits(m) - adapted).norm() < 1e-5 * adapted.norm()


def test_exact_trainable_count_and_names(tiny_hf):
    m = _load(tiny_hf)
    cfg = m.config
    r, H, E, I = 4, cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    model.add_lora(m, r=r, alpha=8, targets=("attention", "experts"), router=True)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    attention = r * (H + q) + 2 * r * (H + kv) + r * (q + H)
    experts = r * E * (H + 2 * I) + r * E * (I + H)
    router = r * (H + E)
    assert sum(trainable.values()) == cfg.num_hidden_layers * (attention + experts + router)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    sd = model.lora_state_dict(m)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (r, H)
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (kv, r)
    assert sd["base_model.model.model.layers.0.mlp.router.lora_B.weight"].shape == (E, r)
    assert sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (r * E, H)
    assert sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (2 * I, r * E)
    assert sd["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (r * E, I)
    assert sd["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (H, r * E)
    # the base weights keep their HF names
    assert "model.layers.0.self_attn.q_proj.weight" in dict(m.named_parameters())


def test_attention_only_and_options(tiny_hf):
    m = _load(tiny_hf)
    model.add_lora(m, r=2, alpha=4, dropout=0.1, targets=("attention",))
    cfg = model.peft_config(m)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and cfg["target_parameters"] == []
    assert cfg["lora_dropout"] == 0.1 and cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["bias"] == "none"
    with pytest.raises(ValueError, match="already"):
        model.add_lora(m, r=2, alpha=4)
    with pytest.raises(ValueError, match="dropout"):
        model.add_lora(_load(tiny_hf), r=2, alpha=4, dropout=0.1, targets=("experts",))
    with pytest.raises(ValueError, match="unknown"):
        model.add_lora(_load(tiny_hf), r=2, alpha=4, targets=("mlp",))


def test_lora_gradients_flow_to_adapters_only(tiny_hf):
    m = _load(tiny_hf)
    model.add_lora(m, r=2, alpha=4, targets=ALL)
    _randomize_b(m)
    m(IDS, labels=IDS).loss.backward()
    for name, p in m.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_state_dict_round_trip_and_peft_loads_our_adapter(tiny_hf, tmp_path):
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config

    m = _load(tiny_hf)
    model.add_lora(m, r=3, alpha=6, targets=ALL)
    _randomize_b(m)
    ours = _logits(m)
    sd = model.lora_state_dict(m)

    other = _load(tiny_hf, "dequantized")
    model.add_lora(other, r=3, alpha=6, targets=ALL)
    model.load_lora_state_dict(other, sd)
    assert (_logits(other) - ours).norm() < 1e-5 * ours.norm()

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(model.peft_config(m)))
    ref = GptOssForCausalLM.from_pretrained(tiny_hf, quantization_config=Mxfp4Config(dequantize=True),
                                            dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    assert (theirs - ours).norm() < 2e-4 * theirs.norm()
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(IDS).logits - ours).norm() > 1e-2 * ours.norm()  # their adapter was live
    with pytest.raises(KeyError):
        model.load_lora_state_dict(other, {k: v for k, v in sd.items() if "router" not in k})
