"""MXFP4 codec against the spec (float64 reference) and transformers' decoder (the oracle)."""

import math

import pytest
import torch

from model import mxfp4

convert = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype])


def _spec_value(nibble: int, scale: int) -> float:
    """E2M1 from its bits (sign, 2-bit exponent with bias 1, 1-bit mantissa) times E8M0, in float64."""
    sign = -1.0 if nibble & 8 else 1.0
    e, m = (nibble >> 1) & 3, nibble & 1
    mag = (m * 0.5) if e == 0 else (1 + m * 0.5) * 2.0 ** (e - 1)
    return math.copysign(mag, sign) * 2.0 ** (scale - 127)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [(5,), (3, 70), (2, 3, 4)])
def test_dequantize_matches_transformers_bit_for_bit(dtype, lead):
    g = torch.Generator().manual_seed(len(lead))
    blocks = torch.randint(0, 256, (*lead, 6, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (*lead, 6), dtype=torch.uint8, generator=g)  # every finite scale byte
    ours = mxfp4.dequantize(blocks, scales, dtype)
    assert ours.shape == (*lead, 6 * 32) and ours.dtype == dtype
    if len(lead) == 2:  # transformers' converter is for [E, rows, G, 16] and transposes the last two dims
        ref = convert(blocks, scales, dtype=dtype).transpose(1, 2)
    else:
        ref = convert(blocks.reshape(1, -1, 6, 16), scales.reshape(1, -1, 6), dtype=dtype)
        ref = ref.transpose(1, 2).reshape(*lead, 6 * 32)
    assert torch.equal(_bits(ours), _bits(ref))


def test_dequantize_every_byte_and_scale_against_the_spec():
    # All 65536 (scale, byte) pairs, checked against a float64 decoding of the bits.
    scales = torch.arange(256, dtype=torch.uint8).repeat_interleave(16).reshape(256, 16)
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(256, 1).reshape(256, 16, 16)
    out = mxfp4.dequantize(blocks, scales, torch.float32).double().reshape(256, 256, 2)
    for s in (0, 1, 100, 127, 130, 200, 254):
        for byte in range(256):
            for half, nib in enumerate((byte & 15, byte >> 4)):
                want = _spec_value(nib, s)
                got = out[s, byte, half].item()
                if math.isinf(got):  # beyond float32's range: overflow, as ldexp gives
                    assert abs(want) > torch.finfo(torch.float32).max
                else:
                    assert got == want and math.copysign(1, got) == math.copysign(1, want), (s, byte, half)
    assert torch.isnan(out[255]).all(), "E8M0 0xFF is NaN"


def test_signed_zero_and_nibble_order():
    blocks = torch.tensor([[[0x80] + [0x21] * 15]], dtype=torch.uint8)  # byte 0: low 0 (+0), high 8 (-0)
    out = mxfp4.dequantize(blocks, torch.tensor([[127]], dtype=torch.uint8), torch.bfloat16)[0]
    assert out[0].item() == 0 and not torch.signbit(out[0]) and torch.signbit(out[1])
    assert out[2].item() == 0.5 and out[3].item() == 1.0  # 0x21: low nibble (even element) 1, high 2


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        mxfp4.dequantize(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))


def test_dequantize_into_a_given_buffer():
    """`out=`: the same values written into the caller's tensor (the experts' reused decode buffer);
    a buffer of another shape or dtype is refused, not silently reallocated."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        buf = torch.full((3, 5, 128), float("nan"), dtype=dtype)
        got = mxfp4.dequantize(blocks, scales, dtype, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, mxfp4.dequantize(blocks, scales, dtype))
    with pytest.raises(ValueError, match="out must be"):
        mxfp4.dequantize(blocks, scales, torch.bfloat16, out=torch.empty(3, 5, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        mxfp4.dequantize(blocks, scales, torch.bfloat16, out=torch.empty(3, 5, 128))


def test_large_input_uses_all_chunks():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 20000, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 20000), dtype=torch.uint8, generator=g)
    ref = convert(blocks.unsqueeze(0), scales.unsqueeze(0), dtype=torch.bfloat16).transpose(1, 2).reshape(3, -1)
    assert torch.equal(_bits(mxfp4.dequantize(blocks, scales)), _bits(ref))


@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_quantize_beats_the_spec_rule(dist):
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        w = torch.randn(2048, 512, generator=g) * 0.02
    else:
        torch.manual_seed(0)
        w = torch.distributions.StudentT(3.0).sample((2048, 512)) * 0.02
    ratio = mxfp4.quantization_mse(w) / mxfp4.quantization_mse(w, rule="spec")
    assert ratio <= 0.97, ratio


def test_spec_rule_is_the_ocp_rule():
    w = torch.tensor([[7.0, 1.0, -0.24, 0.26] + [0.0] * 28])
    blocks, scales = mxfp4.quantize(w, rule="spec")
    assert scales.item() == 127  # floor(log2 7) - 2 = 0
    out = mxfp4.dequantize(blocks, scales, torch.float32)[0]
    assert out[:4].tolist() == [6.0, 1.0, -0.0, 0.5]  # 7 saturates to 6; 0.25 ties to even (0)


def test_quantize_dequantize_round_trip_is_exact_for_representable_values():
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (4, 64, 8, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0] = 0x88  # a block of negative zeros only
    blocks[0, 1, :, :8] = 0x08  # +0 / -0 mixed
    scales = torch.randint(90, 160, (4, 64, 8), dtype=torch.uint8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        w = mxfp4.dequantize(blocks, scales, dtype)
        b2, s2 = mxfp4.quantize(w)
        assert torch.equal(_bits(mxfp4.dequantize(b2, s2, dtype)), _bits(w))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.randn(4, 33))
    with pytest.raises(ValueError, match="inf or NaN"):
        mxfp4.quantize(torch.tensor([float("nan")] * 32))


def test_fake_quant_forward_and_straight_through_gradient():
    w = (torch.randn(6, 64) * 0.05).requires_grad_()
    out = mxfp4.fake_quant(w)
    blocks, scales = mxfp4.quantize(w.detach())
    assert torch.equal(out.detach(), mxfp4.dequantize(blocks, scales, torch.float32))
    upstream = torch.randn(6, 64)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_fake_quant_along_another_dim_is_the_transpose():
    w = torch.randn(3, 64, 5) * 0.1  # HF's [E, in, out] layout: blocks run along dim -2
    assert torch.equal(mxfp4.fake_quant(w, dim=-2), mxfp4.fake_quant(w.transpose(1, 2)).transpose(1, 2))
