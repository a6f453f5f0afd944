"""Float64 checks of each gpt-oss quirk, written out independently, with gradients; fused paths vs the reference."""

import math

import pytest
import torch

from model import mxfp4
from model.config import preset
from model.experts import Experts, swiglu_reference
from model.modeling import GptOssForCausalLM, apply_rotary, eager_attention, yarn_inv_freq

F64 = torch.float64


def test_yarn_frequencies_and_concentration():
    """YaRN as OpenAI's reference writes it (ntk_alpha = beta_slow, ntk_beta = beta_fast), for the 20b shape."""
    cfg = preset("gpt-oss-20b")
    inv, scale = yarn_inv_freq(cfg)
    d, base, factor, ctx = 64, 150000.0, 32.0, 4096
    freq = base ** (torch.arange(0, d, 2, dtype=F64) / d)
    low = d / 2 * math.log(ctx / (32 * 2 * math.pi)) / math.log(base)
    high = d / 2 * math.log(ctx / (1 * 2 * math.pi)) / math.log(base)
    mask = 1 - ((torch.arange(d // 2, dtype=F64) - low) / (high - low)).clamp(0, 1)
    want = (1 / (factor * freq)) * (1 - mask) + (1 / freq) * mask
    torch.testing.assert_close(inv, want, rtol=1e-12, atol=0)
    assert scale == pytest.approx(0.1 * math.log(32) + 1)
    assert inv[0] == pytest.approx(1.0) and inv[-1] == pytest.approx(1 / (factor * freq[-1].item()))


def test_rotary_is_half_split():
    x = torch.randn(1, 3, 2, 8, dtype=F64)
    angle = torch.rand(1, 3, 4, dtype=F64)
    got = apply_rotary(x, angle.cos(), angle.sin())
    for i in range(4):  # dims i and i + 4 rotate as one complex number
        z = torch.complex(x[..., i], x[..., i + 4]) * torch.exp(1j * angle[..., i]).unsqueeze(-1)
        torch.testing.assert_close(got[..., i], z.real)
        torch.testing.assert_close(got[..., i + 4], z.imag)


def test_swiglu_formula_and_clamps():
    h = torch.tensor([[-9.0, -9.0, 8.0, 8.0, 0.5, -0.25, 7.0, -7.5]], dtype=F64)
    got = swiglu_reference(h, 7.0)
    want = []
    for g, u in [(-9.0, -9.0), (8.0, 8.0), (0.5, -0.25), (7.0, -7.5)]:
        g, u = min(g, 7.0), max(min(u, 7.0), -7.0)  # gate clamped above only, up both sides
        want.append(g / (1 + math.exp(-1.702 * g)) * (u + 1))
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64))


def test_sink_attention_formula_with_gradients():
    """softmax over [scores, sink] with the sink dropped, written as explicit sums."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=F64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, dtype=F64, requires_grad=True)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    got = eager_attention(q, k, v, sinks, allowed, 0.5)
    want = torch.zeros_like(got)
    for h in range(2):
        for i in range(5):
            s = [0.5 * (q[0, h, i] @ k[0, h, j]) for j in range(i + 1)]
            denom = sum(torch.exp(x) for x in s) + torch.exp(sinks[h])
            want[0, h, i] = sum(torch.exp(s[j]) / denom * v[0, h, j] for j in range(i + 1))
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v, sinks))
    want_grads = torch.autograd.grad((want * g).sum(), (q, k, v, sinks))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_fused_attention_gradients_match_float64_eager():
    """The fused CPU path (fp32) against the eager reference in float64, sinks and masks included."""
    cfg = preset("tiny").replace(vocab_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    ref = GptOssForCausalLM(cfg, attn_implementation="eager", dtype=F64)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if "norm" in name or "sinks" in name else 0.3))
    fused = GptOssForCausalLM(cfg, attn_implementation="sdpa", dtype=torch.float32)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    ids = torch.randint(0, 64, (2, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    losses = [m(ids, labels=ids, position_ids=pos).loss for m in (ref, fused)]
    assert abs(losses[0].item() - losses[1].item()) < 1e-5 * losses[0].item()
    for loss in losses:
        loss.backward()
    fused_params = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        if "self_attn" in name:  # fp32 rounding alone gives ~1e-5 (the eager path in fp32 does the same)
            assert (fused_params[name].grad.double() - p.grad).norm() < 1e-4 * p.grad.norm(), name
    assert ref.model.layers[0].self_attn.sinks.grad.abs().min() > 0


def test_flex_attention_path_matches_float64_eager(monkeypatch):
    """The CUDA path (flex attention with block masks, GQA without repeated kv, the sink through
    sigmoid(lse - s)) run on CPU with flex's math implementation, values and gradients, packed rows
    and sliding windows included. Flex refuses backward on CPU because it has no fused CPU backward;
    lifting that check runs its reference math, which is what this test is about. Flex returns lse in
    fp32 whatever the input dtype, so agreement is at fp32 precision."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    cfg = preset("tiny").replace(vocab_size=64, num_hidden_layers=2, sliding_window=6)
    torch.manual_seed(0)
    ref = GptOssForCausalLM(cfg, attn_implementation="eager", dtype=F64)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if "norm" in name or "sinks" in name else 0.3))
    flex = GptOssForCausalLM(cfg, attn_implementation="flex", dtype=F64)
    flex.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 24))
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])  # rows differ
    losses = [m(ids, labels=ids, position_ids=pos).loss for m in (ref, flex)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for loss in losses:
        loss.backward()
    flex_params = dict(flex.named_parameters())
    for name, p in ref.named_parameters():
        assert (flex_params[name].grad - p.grad).norm() < 1e-5 * p.grad.norm(), name
    assert flex.model.layers[0].self_attn.sinks.grad.abs().min() > 0
    with torch.no_grad():  # logits without labels, one row
        got, want = flex(ids[:1]).logits, ref(ids[:1]).logits
    assert (got - want).norm() < 1e-6 * want.norm()


def test_flex_attention_under_torch_compile_traces_once_per_mask_kind(monkeypatch):
    """On CUDA flex runs compiled (model.modeling._flex). Dynamo's tracing is the same on every
    device, so it is checked here with the aot_eager backend (no CPU kernel for lse): the traced
    path gives the eager values and gradients, and fresh block masks each step (new packing, new
    closures) reuse the graph of their mask kind instead of recompiling every step."""
    import torch._dynamo
    import torch.nn.attention.flex_attention as fa
    from torch._dynamo.utils import counters

    import model.modeling as modeling
    from model.modeling import attention_masks, flex_block_masks, flex_sink_attention

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)  # backward on CPU: see the test above
    compiled = torch.compile(fa.flex_attention, backend="aot_eager", dynamic=False)
    monkeypatch.setattr(modeling, "_flex", lambda device: compiled)
    torch._dynamo.reset()
    counters.clear()
    cfg = preset("tiny").replace(sliding_window=6)
    torch.manual_seed(0)
    b, t = 2, 64
    for step in range(3):
        pos = torch.stack([torch.cat([torch.arange(20 + step), torch.arange(t - 20 - step)]), torch.arange(t)])
        q, k, v = (torch.randn(b, n, t, 16, dtype=F64, requires_grad=True) for n in (4, 2, 2))
        sinks = torch.randn(4, dtype=F64, requires_grad=True)
        flex, allowed = flex_block_masks(pos, cfg), attention_masks(pos, cfg)
        for kind in flex:
            got = flex_sink_attention(q, k, v, sinks, flex[kind], 0.25)
            want = eager_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), sinks, allowed[kind], 0.25)
            g = torch.randn_like(got)
            for a, w in zip(torch.autograd.grad((got * g).sum(), (q, k, v, sinks)),
                            torch.autograd.grad((want * g).sum(), (q, k, v, sinks))):
                torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)  # lse is fp32 in flex
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2  # full and sliding, traced once each
    torch._dynamo.reset()


def _tiny_experts(fmt, dtype, seed=0):
    cfg = preset("tiny").replace(num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    ex = Experts(cfg, fmt=fmt, dtype=dtype)
    w1 = torch.randn(4, 128, 64) * 0.3  # [E, out, in]
    w2 = torch.randn(4, 64, 64) * 0.3
    b1, s1 = mxfp4.quantize(w1)
    b2, s2 = mxfp4.quantize(w2)
    with torch.no_grad():
        if fmt == "mxfp4":
            ex.gate_up_proj_blocks.copy_(b1), ex.gate_up_proj_scales.copy_(s1)
            ex.down_proj_blocks.copy_(b2), ex.down_proj_scales.copy_(s2)
        else:
            ex.gate_up_proj.copy_(mxfp4.dequantize(b1, s1, torch.float32).transpose(1, 2))
            ex.down_proj.copy_(mxfp4.dequantize(b2, s2, torch.float32).transpose(1, 2))
        ex.gate_up_proj_bias.normal_(0, 0.5)
        ex.down_proj_bias.normal_(0, 0.5)
    return ex


def _expert_reference(ex, x, idx, w):
    """Token by token, slot by slot, the formula of docs/ARCHITECTURE.md §4 with PEFT's LoRA layout."""
    out = torch.zeros_like(x)
    E, s = ex.num_experts, ex.lora_scaling
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot].item()
            w1, w2 = ex.dense_weight("gate_up_proj")[e], ex.dense_weight("down_proj")[e]
            h = x[t] @ w1 + ex.gate_up_proj_bias[e]
            if ex.has_lora:
                a, b = ex.base_layer.lora_A.weight, ex.base_layer.lora_B.weight
                r = a.shape[0] // E
                h = h + s * (b[:, [j * E + e for j in range(r)]] @ (a[e * r:(e + 1) * r] @ x[t]))
            g, u = h[0::2].clamp(max=7), h[1::2].clamp(-7, 7)
            act = g * torch.sigmoid(1.702 * g) * (u + 1)
            y = act @ w2 + ex.down_proj_bias[e]
            if ex.has_lora:
                a, b = ex.lora_A.weight, ex.lora_B.weight
                y = y + s * (b[:, [j * E + e for j in range(r)]] @ (a[e * r:(e + 1) * r] @ act))
            out[t] += w[t, slot] * y
    return out


@pytest.mark.parametrize("fmt", ["mxfp4", "dequantized"])
def test_expert_forward_and_gradients_match_float64_reference(fmt):
    """Sorted grouped routing, fused SwiGLU, recomputed MXFP4 decode and expert LoRA against the
    token-by-token formula in float64: outputs and gradients of x, router weights, biases, LoRA."""
    ex = _tiny_experts(fmt, torch.float32)
    ex.add_lora(r=3, alpha=6)
    ref = _tiny_experts("dequantized", F64)
    ref.add_lora(r=3, alpha=6)
    with torch.no_grad():
        for p in (ex.base_layer.lora_B.weight, ex.lora_B.weight):
            p.normal_(0, 0.3)
    ref.load_state_dict({k: v.double() for k, v in ex.state_dict().items() if v.is_floating_point()} | {
        "gate_up_proj": ex.dense_weight("gate_up_proj").double(), "down_proj": ex.dense_weight("down_proj").double()},
        strict=False)
    x = torch.randn(9, 64, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    w = torch.rand(9, 2, requires_grad=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    got, want = ex(x, idx, w), _expert_reference(ref, x64, idx, w64)
    assert (got.double() - want).norm() < 1e-6 * want.norm()
    g = torch.randn_like(want)
    (got * g.float()).sum().backward()
    (want * g).sum().backward()
    pairs = [(x.grad, x64.grad), (w.grad, w64.grad)]
    for name in ("gate_up_proj_bias", "down_proj_bias", "base_layer.lora_A.weight", "base_layer.lora_B.weight",
                 "lora_A.weight", "lora_B.weight"):
        pairs.append((ex.get_parameter(name).grad, ref.get_parameter(name).grad))
    if fmt == "dequantized":
        pairs += [(ex.gate_up_proj.grad, ref.gate_up_proj.grad), (ex.down_proj.grad, ref.down_proj.grad)]
    for a, b in pairs:  # fp32 against float64: relative error of the whole tensor
        assert (a.double() - b).norm() < 1e-5 * b.norm()


def test_mxfp4_experts_decode_one_expert_at_a_time(monkeypatch):
    """Only experts the batch hits are decoded, one at a time, in forward and again in backward."""
    ex = _tiny_experts("mxfp4", torch.float32)
    ex.gate_up_proj_bias.requires_grad_(False)
    calls = []
    real = mxfp4.dequantize
    monkeypatch.setattr(mxfp4, "dequantize", lambda b, s, d, **kw: calls.append(tuple(b.shape)) or real(b, s, d, **kw))
    x = torch.randn(5, 64, requires_grad=True)
    idx = torch.tensor([[0, 2]] * 5)  # experts 1 and 3 unused
    y = ex(x, idx, torch.full((5, 2), 0.5))
    assert calls == [(128, 2, 16), (64, 2, 16)] * 2  # per expert: gate_up then down
    y.sum().backward()
    assert len(calls) == 8 and all(len(c) == 3 for c in calls)
