"""QAT: experts run through MXFP4 fake-quant of their effective weight, with straight-through gradients."""

import copy

import pytest
import torch

import model as modellib
from model import mxfp4


@pytest.fixture(scope="module")
def tuned(tiny_hf):
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="mxfp4")
    modellib.add_lora(m, r=4, alpha=8, targets=("experts",))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so the update changes the weights by a fraction of a step
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def test_qat_forward_is_the_requantized_merged_model(tuned):
    ids = torch.randint(0, 200000, (2, 24), generator=torch.Generator().manual_seed(1))
    merged = copy.deepcopy(tuned)
    modellib.merge_lora(merged)
    with torch.no_grad():
        for layer in merged.model.layers:
            ex = layer.mlp.experts
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(ex, proj)  # [E, in, out]: blocks along in
                getattr(ex, proj).copy_(mxfp4.fake_quant(w, dim=-2))
    assert modellib.set_qat(tuned, True) == 2
    try:
        with torch.no_grad():
            a, b = tuned(ids).logits, merged(ids).logits
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    finally:
        modellib.set_qat(tuned, False)
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, a, atol=1e-5), "QAT changes the forward"


def test_qat_gradients_reach_the_lora_factors(tuned):
    ids = torch.randint(0, 200000, (2, 24), generator=torch.Generator().manual_seed(2))
    modellib.set_qat(tuned, True)
    try:
        tuned.zero_grad()
        tuned(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in tuned.named_parameters() if "lora_" in n}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    finally:
        modellib.set_qat(tuned, False)
