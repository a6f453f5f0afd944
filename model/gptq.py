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

def _round_fp4(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """w rounded to the nearest value of step * E2M1 (saturating at +-6 step); element-wise. The E2M1
    magnitudes are evenly spaced by 1/2 below 2, by 1 up to 4, by 2 up to 6: rounding on that
    spacing is arithmetic only (no search), which matters in GPTQ's per-column steps."""
    mag = (w.abs() / step).clamp_(max=6.0)
    spacing = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    mag = torch.round(mag / spacing).mul_(spacing)
    return torch.copysign(mag.mul_(step), w)


def choose_scales(w: torch.Tensor, keep_scales: torch.Tensor | None) -> torch.Tensor:
    """Scale bytes `[..., out, G]` for `w [..., out, in]`: the kept scale of each block whose values it
    still covers (|w| <= 6 * scale: nothing clips), the searched nearest-rounding scale otherwise.
    The search runs on the uncovered blocks only: a fine-tune moves few blocks past their scale."""
    if keep_scales is None:
        return mxfp4.quantize(w)[1]
    blocks = w.reshape(*keep_scales.shape, mxfp4.BLOCK)
    covers = blocks.abs().amax(-1) <= 6.0 * torch.exp2(keep_scales.to(torch.float32) - mxfp4.SCALE_BIAS)
    if bool(covers.all()):
        return keep_scales
    scales = keep_scales.clone()
    scales[~covers] = mxfp4.quantize(blocks[~covers])[1].squeeze(-1)
    return scales


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with U^T U = h^-1 (GPTQ's H^-1 factor) from one Cholesky and one triangular
    inverse, instead of Cholesky, inverse, Cholesky: with J the reversal, J chol(J h J) J = R is
    upper with h = R R^T, so h^-1 = (R^-1)^T R^-1 and U = R^-1. Batched over leading dimensions."""
    r = torch.linalg.cholesky(h.flip(-2, -1)).flip(-2, -1)
    return _inverse_upper(r)


def _inverse_upper(r: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """The inverse of upper-triangular `r` by halves, [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1],
    [0, C^-1]]: n^3/3 multiply-adds, mostly in matrix products, where a triangular solve against
    the identity spends n^3 (it cannot know the right-hand side is triangular)."""
    n = r.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=r.dtype, device=r.device).expand_as(r)
        return torch.linalg.solve_triangular(r, eye, upper=True)
    m = n // 2
    a_inv, c_inv = _inverse_upper(r[..., :m, :m], leaf), _inverse_upper(r[..., m:, m:], leaf)
    out = torch.zeros_like(r)
    out[..., :m, :m], out[..., m:, m:] = a_inv, c_inv
    out[..., :m, m:] = -(a_inv @ r[..., :m, m:] @ c_inv)
    return out


_BATCH_ELEMENTS = 1 << 26


def batch_size_for(out_dim: int, in_dim: int) -> int:
    """How many `[out_dim, in_dim]` matrices `gptq_quantize` takes at once: a batch amortises the
    per-column Python steps over its matrices while its working tensors (the weights, their steps and
    the result in fp32, about 1 GiB in all) stay a fraction of one layer."""
    return max(1, _BATCH_ELEMENTS // (out_dim * in_dim))


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, *, keep_scales: torch.Tensor | None = None,
                  damp: float = 0.01, block: int = 128, sub_block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [out, in]` to MXFP4 minimising `||X (W - Q)^T||` for inputs with `gram = X^T X`;
    or a batch of them (`w [B, out, in]`, `gram [B, in, in]`, `keep_scales [B, out, G]`), each
    with its own inputs: the experts of a layer go through together (`batch_size_for`).

    GPTQ (arXiv:2210.17323, Algorithm 1) with the block scales fixed up front by `choose_scales`:
    columns are rounded left to right; each column's error, divided by the pivot of the Cholesky
    factor of H^-1, is subtracted from the columns to its right. Those updates are lazy, as in the
    paper's section 3 ("lazy batch updates"), on two levels: rank-1 within `sub_block` columns,
    one matrix product per finished sub-block for the rest of its `block`, and one per finished
    block for the rest of the matrix, so nearly all the arithmetic is in large matrix products and
    the per-column work touches `sub_block` columns. `damp` * mean(diag H) is added to the diagonal,
    as in the paper, so few tokens still give a well-conditioned H. H^-1 is factored in fp32, as the
    authors' code does. Returns (blocks [..., out, in/32, 16], scales [..., out, in/32]).
    """
    single = w.ndim == 2
    if single:
        w, gram = w.unsqueeze(0), gram.unsqueeze(0)
        keep_scales = keep_scales.unsqueeze(0) if keep_scales is not None else None
    w = w.float()
    n, out_dim, in_dim = w.shape
    scales = choose_scales(w, keep_scales)
    h = gram.to(torch.float32, copy=True)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # inputs never seen: their columns are simply rounded
    diag += damp * diag.mean(-1, keepdim=True)
    # "Act order" (the GPTQ authors' reference code): round the columns with the largest input
    # energy first, while the most later columns remain to absorb their error.
    perm = torch.argsort(diag, dim=-1, descending=True)  # [n, in]
    # Per matrix, and rows only: indexing whole rows copies contiguous memory, where a gather or a
    # column index is several times slower. h is symmetric, so h[p][:, p] = (h[p])^T[p].
    h = torch.stack([hk[pk].t().contiguous()[pk] for hk, pk in zip(h, perm)])
    hinv = _upper_cholesky_of_inverse(h)
    del h
    # Transposed, `[n, in, out]`, in the rounding order: each column is a contiguous row, so the
    # per-column steps read and write contiguous memory.
    wt = torch.stack([wk.t().contiguous()[pk] for wk, pk in zip(w, perm)])
    step = torch.exp2(scales.to(torch.float32) - mxfp4.SCALE_BIAS).transpose(1, 2)  # [n, G, out]
    step = torch.stack([sk[pk // mxfp4.BLOCK] for sk, pk in zip(step, perm)])
    qt = torch.empty_like(wt)
    for i1 in range(0, in_dim, block):
        i2 = min(i1 + block, in_dim)
        w1, hinv1 = wt[:, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for j1 in range(0, i2 - i1, sub_block):
            j2 = min(j1 + sub_block, i2 - i1)
            for j in range(j1, j2):
                col = w1[:, j]
                qc = _round_fp4(col, step[:, i1 + j])
                qt[:, i1 + j] = qc
                err = (col - qc) / hinv1[:, j, j].unsqueeze(1)
                err1[:, j] = err
                if j + 1 < j2:  # in place, as one batched outer product
                    w1[:, j + 1:j2].baddbmm_(hinv1[:, j, j + 1:j2].unsqueeze(2), err.unsqueeze(1), alpha=-1)
            if j2 < i2 - i1:
                w1[:, j2:].baddbmm_(hinv1[:, j1:j2, j2:].transpose(1, 2), err1[:, j1:j2], alpha=-1)
        if i2 < in_dim:
            wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1)
    del wt, step
    q = torch.empty_like(qt)
    for qk, qtk, pk in zip(q, qt, perm):
        qk[pk] = qtk  # back to the input order
    q = q.transpose(1, 2)  # [n, out, in]
    blocks = mxfp4.quantize_with_scales(q, scales)
    return (blocks[0], scales[0]) if single else (blocks, scales)
