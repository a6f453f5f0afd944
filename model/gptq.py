"""GPTQ for MXFP4: round a changed weight to MXFP4 so that its output on real inputs, not each
weight, stays close (docs/ARCHITECTURE.md §6).

Re-rounding `W + delta` to nearest erases every change smaller than half a quantization step, which
is most of a fine-tune. GPTQ (Frantar et al., arXiv:2210.17323) rounds the columns (input dims) one
at a time and pushes each rounding error onto the columns not yet rounded through the inverse of
`H = X^T X`, so `X W^T` stays close to the tuned layer's even where single weights cannot move.
The block scales are fixed before rounding (`choose_scales`): the base's scale for each block whose
values it still covers, a fresh scale otherwise.

Only `X^T X` is needed here; gathering X (a model's inputs on calibration tokens) is the caller's.
"""

from __future__ import annotations

import torch

from . import mxfp4

_FP4_MAGNITUDES = torch.tensor(mxfp4.FP4_VALUES[:8])
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2


def _round_fp4(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """w rounded to the nearest value of step * E2M1 (saturating at +-6 step); element-wise."""
    code = torch.bucketize((w / step).abs(), _FP4_MIDPOINTS.to(w.device))
    return torch.copysign(_FP4_MAGNITUDES.to(w.device)[code] * step, w)


def choose_scales(w: torch.Tensor, keep_scales: torch.Tensor | None) -> torch.Tensor:
    """Scale bytes `[out, G]` for `w [out, in]`: the kept scale of each block whose values it still
    covers (|w| <= 6 * scale: nothing clips), the searched nearest-rounding scale otherwise."""
    fresh = mxfp4.quantize(w)[1]
    if keep_scales is None:
        return fresh
    amax = w.abs().reshape(*keep_scales.shape, mxfp4.BLOCK).amax(-1)
    covers = amax <= 6.0 * torch.exp2(keep_scales.to(torch.float32) - mxfp4.SCALE_BIAS)
    return torch.where(covers, keep_scales, fresh)


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with U^T U = h^-1 (GPTQ's H^-1 factor) from one Cholesky and one triangular
    solve, instead of Cholesky, inverse, Cholesky (9x faster at 2880): with J the reversal,
    J chol(J h J) J = R is upper with h = R R^T, so h^-1 = (R^-1)^T R^-1 and U = R^-1."""
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(r, torch.eye(h.shape[0], dtype=h.dtype, device=h.device), upper=True)


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, *, keep_scales: torch.Tensor | None = None,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [out, in]` to MXFP4 minimising `||X (W - Q)^T||` for inputs with `gram = X^T X`.

    GPTQ (arXiv:2210.17323, Algorithm 1) with the block scales fixed up front by `choose_scales`:
    columns are rounded left to right; each column's error, divided by the pivot of the Cholesky
    factor of H^-1, is subtracted from the columns to its right (lazily, `block` columns at a time).
    `damp` * mean(diag H) is added to the diagonal, as in the paper, so few tokens still give a
    well-conditioned H. Returns (blocks [out, in/32, 16], scales [out, in/32]).
    """
    w = w.float()
    out_dim, in_dim = w.shape
    scales = choose_scales(w, keep_scales)
    step = torch.exp2(scales.to(torch.float32) - mxfp4.SCALE_BIAS)
    step = step.repeat_interleave(mxfp4.BLOCK, dim=1)  # [out, in]
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: their columns are simply rounded
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(in_dim, dtype=h.dtype, device=h.device)
    # "Act order" (the GPTQ authors' reference code): round the columns with the largest input
    # energy first, while the most later columns remain to absorb their error.
    perm = torch.argsort(torch.diagonal(h), descending=True)
    h, w, step = h[perm][:, perm], w[:, perm], step[:, perm]
    hinv = _upper_cholesky_of_inverse(h).to(w.dtype)
    w = w.clone()
    q = torch.empty_like(w)
    for i1 in range(0, in_dim, block):
        i2 = min(i1 + block, in_dim)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.empty(out_dim, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = _round_fp4(col, step[:, i1 + i])
            q[:, i1 + i] = qc
            err = (col - qc) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]  # back to the input order
    return mxfp4.quantize_with_scales(q, scales), scales
