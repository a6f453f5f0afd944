"""MXFP4 codec (OCP Microscaling Formats v1.0, E2M1 elements with one E8M0 scale per 32).

Layout, as stored by gpt-oss: `blocks` uint8 `[..., G, 16]` (two elements a byte: the low nibble is
the even element, the high nibble the odd one) and `scales` uint8 `[..., G]`; element i of block g
is `FP4[nibble] * 2**(scales[g] - 127)`. Scale byte 0xFF is NaN (E8M0). No model knowledge here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

# E2M1 value of each nibble; bit 3 is the sign (so nibble 8 is -0.0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127

# Rows of 16 bytes decoded per task: the index and output of one task stay in L2.
_CPU_ROWS_PER_TASK = 16384
_GPU_ROWS_PER_CHUNK = 1 << 22
_pool: ThreadPoolExecutor | None = None


def _packed_dtype(dtype: torch.dtype) -> torch.dtype:
    # Two decoded values of `dtype` share one integer of this width, so one gather decodes a byte.
    return {2: torch.int32, 4: torch.int64}[torch.empty((), dtype=dtype).element_size()]


@lru_cache(maxsize=None)
def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """65536 entries indexed by (scale byte << 8) | data byte: both decoded values, scale applied.

    Built in float64, where every product is exact, then rounded once to `dtype`: in-range values
    are exact, subnormals stay subnormal, and overflow becomes inf exactly as ldexp would.
    """
    nib = torch.arange(256)
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float64)
    pair = torch.stack([fp4[nib & 15], fp4[nib >> 4]], dim=-1)  # [byte, 2]
    scale = torch.pow(2.0, torch.arange(256, dtype=torch.float64) - SCALE_BIAS)
    scale[255] = float("nan")  # E8M0 reserves 0xFF for NaN
    table = (scale[:, None, None] * pair[None]).to(dtype)  # [scale, byte, 2]
    return table.reshape(-1).view(_packed_dtype(dtype)).to(device).contiguous()


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)} must be scales "
            f"{tuple(scales.shape)} + (16,)"
        )


def _cpu_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="mxfp4")
    return _pool


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 `[..., G, 16]` and `[..., G]` -> `[..., G*32]` of `dtype`, bit-exact to the spec.

    A table look-up (docs/ARCHITECTURE.md §6): index = scale byte * 256 + data byte picks both decoded values at
    once. On CPU the rows are cut into cache-sized tasks spread over a thread pool (the gathers
    release the GIL); ~14x transformers' decoder on 2 cores (benchmarks/bench_mxfp4.py).
    out: a contiguous `[..., G*32]` tensor of `dtype` on the blocks' device to decode into.
    """
    _check_pair(blocks, scales)
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize needs a floating dtype, got {dtype}")
    lead = blocks.shape[:-2]
    groups = blocks.shape[-2]
    table = _pair_table(dtype, blocks.device)
    b2 = blocks.reshape(-1, BLOCK // 2)
    s2 = scales.reshape(-1)
    rows = b2.shape[0]
    shape = (*lead, groups * BLOCK)
    if out is None:
        out = torch.empty(rows, BLOCK // 2, dtype=table.dtype, device=blocks.device)
    else:
        if tuple(out.shape) != shape or out.dtype != dtype or out.device != blocks.device or not out.is_contiguous():
            raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of shape {shape} on {blocks.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        out = out.view(table.dtype).view(rows, BLOCK // 2)

    def decode(r0: int, r1: int) -> None:
        # Widen the data bytes once and OR the shifted scales in place: `int32 | uint8` would first
        # copy the uint8 operand to int32 (type promotion) and then write a third tensor.
        index = b2[r0:r1].to(torch.int32)
        index |= (s2[r0:r1].to(torch.int32) << 8).unsqueeze(-1)
        torch.index_select(table, 0, index.view(-1), out=out[r0:r1].view(-1))

    if blocks.device.type == "cpu":
        step = _CPU_ROWS_PER_TASK
        if rows <= step:
            decode(0, rows)
        else:
            list(_cpu_pool().map(lambda r0: decode(r0, min(r0 + step, rows)), range(0, rows, step)))
    else:
        for r0 in range(0, rows, _GPU_ROWS_PER_CHUNK):
            decode(r0, min(r0 + _GPU_ROWS_PER_CHUNK, rows))
    return out.view(dtype).reshape(shape)


# Midpoints between neighbouring E2M1 magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6], each with whether a tie
# rounds up (to the even code above): round-half-to-even on the 3-bit code.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_ROWS_PER_QUANT_CHUNK = 1 << 16


def _fp4_codes(mag: torch.Tensor) -> torch.Tensor:
    """Magnitudes (already divided by the block scale) -> nearest E2M1 code 0..7, saturating at 6."""
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for mid, tie_up in _MIDPOINTS:
        code += (mag >= mid) if tie_up else (mag > mid)
    return code


@lru_cache(maxsize=None)
def _magnitudes(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=device)


def _quantize_rows(w: torch.Tensor, deltas: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """w float32 `[R, 32]` -> codes uint8 `[R, 32]` (sign in bit 3) and scale bytes `[R]`.

    The spec's exponent is floor(log2(amax)) - 2, so amax / 2^e lies in [4, 8) and values above 6
    saturate. Each block takes the exponent spec + delta (delta from `deltas`, the first winning
    ties) with the least squared error after round-to-nearest-even.
    """
    absw = w.abs()
    amax = absw.amax(dim=-1)
    # frexp: amax = m * 2^x with m in [0.5, 1), so floor(log2(amax)) = x - 1.
    spec_e = torch.where(amax > 0, torch.frexp(amax)[1] - 3, -SCALE_BIAS)
    mags = _magnitudes(w.device)
    best_err = best_code = best_e = None
    for delta in deltas:
        e = (spec_e + delta).clamp(-SCALE_BIAS, SCALE_BIAS)
        step = torch.ldexp(torch.ones_like(absw[:, :1]), e.unsqueeze(-1))
        code = _fp4_codes(absw / step)
        if best_err is None:
            best_code, best_e = code, e
            if len(deltas) > 1:
                best_err = (mags[code.long()] * step - absw).square().sum(dim=-1)
            continue
        err = (mags[code.long()] * step - absw).square().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_code = torch.where(better.unsqueeze(-1), code, best_code)
        best_e = torch.where(better, e, best_e)
    sign = torch.signbit(w).to(torch.uint8) << 3  # keeps -0.0 as nibble 8
    return best_code | sign, (best_e + SCALE_BIAS).to(torch.uint8)


# Exponent candidates around the spec's choice: one step up never clips, one step down trades
# clipping of the largest value for finer steps everywhere else.
_RULES = {"search": (0, 1, -1), "spec": (0,)}


def quantize(w: torch.Tensor, rule: str = "search") -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., K]` (K a multiple of 32, blocks along the last dim) -> `(blocks [..., K/32, 16], scales [..., K/32])`.

    rule="search" (default) picks each block's scale among the spec exponent and its two neighbours
    by least squared error (docs/ARCHITECTURE.md §4: a few percent below the spec rule's MSE); rule="spec" is the
    OCP rule alone, the baseline. The spec's exponent wins ties, so values already representable
    come back bit for bit, signed zeros included. Non-finite input is an error.
    """
    if rule not in _RULES:
        raise ValueError(f"quantize: unknown rule {rule!r}; use one of {sorted(_RULES)}")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"quantize: last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize: weights contain inf or NaN")
    lead, k = w.shape[:-1], w.shape[-1]
    rows = w.reshape(-1, BLOCK)
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows.shape[0], dtype=torch.uint8, device=w.device)
    for r0 in range(0, rows.shape[0], _ROWS_PER_QUANT_CHUNK):
        r1 = r0 + _ROWS_PER_QUANT_CHUNK
        codes[r0:r1], scales[r0:r1] = _quantize_rows(rows[r0:r1].float(), _RULES[rule])
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return blocks.reshape(*lead, k // BLOCK, BLOCK // 2), scales.reshape(*lead, k // BLOCK)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`w [..., K]` rounded to nearest (ties to even, saturating at +-6) on the given scale bytes
    `[..., K/32]` -> blocks `[..., K/32, 16]`. For requantization that keeps chosen scales; values
    already on those scales' grids come back exactly."""
    if scales.dtype != torch.uint8 or w.shape[:-1] != scales.shape[:-1] or w.shape[-1] != scales.shape[-1] * BLOCK:
        raise ValueError(f"quantize_with_scales: w {tuple(w.shape)} needs uint8 scales of shape "
                         f"{(*w.shape[:-1], w.shape[-1] // BLOCK)}, got {scales.dtype} {tuple(scales.shape)}")
    rows = w.reshape(-1, BLOCK).float()
    step = torch.ldexp(torch.ones_like(rows[:, :1]), scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS)
    codes = _fp4_codes(rows.abs() / step) | (torch.signbit(rows).to(torch.uint8) << 3)
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return blocks.reshape(*scales.shape, BLOCK // 2)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        blocks, scales = quantize(w.detach())
        return dequantize(blocks, scales, dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad  # straight-through estimator (Bengio et al. 2013, arXiv:1308.3432)


def fake_quant(w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Round `w` through MXFP4 (blocks of 32 along `dim`) with a straight-through gradient, for QAT.

    HF stores bf16 experts transposed (`[E, in, out]`), so their blocks run along dim=-2.
    """
    if dim in (-1, w.ndim - 1):
        return _FakeQuant.apply(w)
    return _FakeQuant.apply(w.transpose(dim, -1)).transpose(dim, -1)


def quantization_mse(w: torch.Tensor, rule: str = "search") -> float:
    """Mean squared error of quantize -> dequantize on `w`, for benchmarks and tests."""
    blocks, scales = quantize(w, rule)
    return (dequantize(blocks, scales, torch.float32).reshape(w.shape) - w.float()).square().mean().item()
