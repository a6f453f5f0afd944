"""What every training objective needs from the model: log-probabilities of the target tokens.

    trained = trained_targets(labels, position_ids)            # [B, T-1] bool: the one definition
    logp = target_logprobs(hidden[:, :-1][trained], lm_head.weight, labels[:, 1:][trained])  # [n]
    sft_loss = -logp.sum() / logp.numel()                      # mean cross-entropy
    seq_logp = sequence_sums(logp, trained)                    # [B]: DPO's and GRPO's sequence log-probs

At gpt-oss's vocabulary (201088), logits cost 0.8 MB per token in fp32, so they are computed only for
trained targets, one chunk of rows at a time, and never kept for backward: each chunk's gradient
with respect to its hidden rows is formed on the spot (docs/ARCHITECTURE.md §6). The log-probability
of row i depends on its own hidden row only, so d(logp_i)/d(h_i) = W[y_i] - softmax_i @ W is one
`[n, H]` tensor whatever the objective later does with logp; backward scales its rows. The lm_head's
own gradient (full fine-tuning) is summed in forward for an upstream gradient equal on every token
(SFT's mean), and recomputed chunk by chunk when it is not (per-sequence weights of DPO, GRPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that is not trained (HF's convention; `data.collate` writes it)."""


def trained_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T-1]` bool: position t is trained to predict token t + 1. A target is trained when it is
    labeled and does not start a packed example (no position learns to predict the first token of
    the next example; `position_ids` restart at 0 there)."""
    return (labels[:, 1:] != IGNORE_INDEX) & (position_ids[:, 1:] != 0)


def count_trained(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """The number of trained targets in a batch: what the loss of that batch sums over."""
    return int(trained_targets(labels, position_ids).sum())


def sequence_sums(values: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Per-row sums `[B]` of flat per-target `values [n]` laid out as `trained [B, T-1]`'s True entries."""
    rows = trained.nonzero(as_tuple=True)[0]
    return values.new_zeros(trained.shape[0]).index_add(0, rows, values)


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    chunk: int = 256) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[i, targets[i]] as fp32 `[n]`, for hidden `[n, H]`, weight `[V, H]`.

    Differentiable in hidden and weight; at most one `[chunk, V]` fp32 buffer exists at a time."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _TargetLogprobs.apply(hidden, weight, targets, chunk)
    return _chunked(hidden, weight, targets, chunk, need_h=False, need_w=False)[0]


def _chunked(h, weight, y, chunk: int, *, need_h: bool, need_w: bool):
    """(logp [n] fp32, d logp_i / d h_i [n, H] or None, sum_i d logp_i / d W [V, H] or None)."""
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros_like(weight) if need_w else None
    for i in range(0, h.shape[0], chunk):
        # one call per chunk: its [c, V] buffer is freed on return, before the next one is allocated
        rows = slice(i, i + chunk)
        logp[rows] = _chunk(h[rows], weight, y[rows], None if dh is None else dh[rows], dw)
    return logp, dh, dw


def _chunk(hc, weight, yc, dh, dw, upstream: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk: returns its logp; writes d logp / d h into `dh` (its rows) and adds
    sum_i upstream_i * d logp_i / d W (upstream 1 when None) into `dw`."""
    logits = F.linear(hc, weight).float()  # [c, V]
    target = logits.gather(1, yc[:, None]).squeeze(1)
    top = logits.amax(-1, keepdim=True)
    denom = logits.sub_(top).exp_().sum(-1, keepdim=True)  # logits now hold exp(z - max)
    logp = target - top.squeeze(1) - denom.squeeze(1).log()
    if dh is not None or dw is not None:
        # d logp / d z = onehot - softmax, formed in place in the one [c, V] buffer
        grad = logits.div_(denom).neg_()
        grad[torch.arange(grad.shape[0], device=grad.device), yc] += 1.0
        if upstream is not None:
            grad.mul_(upstream[:, None])
        grad = grad.to(weight.dtype)
        if dh is not None:
            torch.matmul(grad, weight, out=dh)
        if dw is not None:
            dw.addmm_(grad.t(), hc.to(weight.dtype))
    return logp


class _TargetLogprobs(torch.autograd.Function):
    """`target_logprobs` with gradients formed in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp, dh, dw = _chunked(h, weight, y, chunk, need_h=need_h, need_w=need_w)
        ctx.save_for_backward(dh, dw, h if need_w else None, weight if need_w else None, y)
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(ctx, grad):  # grad [n]: d(objective) / d(logp_i)
        dh, dw, h, weight, y = ctx.saved_tensors
        grad_h = grad_w = None
        if dh is not None:
            grad_h = dh * grad.to(dh.dtype)[:, None]
        if dw is not None:
            if grad.numel() and bool((grad == grad[0]).all()):  # SFT: one weight for every token
                grad_w = dw * grad[0].to(dw.dtype)
            else:  # per-sequence weights: sum each chunk's gradient again under its own weights
                grad_w = torch.zeros_like(dw)
                for i in range(0, h.shape[0], ctx.chunk):
                    rows = slice(i, i + ctx.chunk)
                    _chunk(h[rows], weight, y[rows], None, grad_w, upstream=grad[rows].float())
        return grad_h, grad_w, None, None
