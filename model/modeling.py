"""gpt-oss in plain PyTorch, shaped like OpenAI's reference (`gpt_oss/torch/model.py`), with HF names.

Parameter names equal transformers' `GptOssForCausalLM` (docs/ARCHITECTURE.md §3), so HF checkpoints load with
zero renames and OpenAI's original/ layout loads through `Checkpoint`'s name table. The facts
(docs/ARCHITECTURE.md §4): attention with one learned sink logit per head, sliding window on sliding layers, GQA,
YaRN RoPE (arXiv:2309.00071) on half-split dims, q/k/v/o biases; a top-k router with softmax over
the chosen k; clamped interleaved SwiGLU experts (`experts.py`); RMSNorm.

Training-time memory (docs/ARCHITECTURE.md §6): with labels, the targets' log-probabilities come from
`loss.target_logprobs` (logits only at trained positions, in chunks, none kept for backward);
`gradient_checkpointing_enable()` recomputes each decoder layer; `attn_implementation="sdpa"` runs a
fused kernel that never materialises `T x T` scores and adds the sink through the log-sum-exp:
PyTorch's flash kernel on CPU, compiled flex attention (block-sparse: sliding windows and packed
examples skip whole tiles) on CUDA.

Packed batches: `position_ids` restart at 0 where an example begins; attention never crosses such
a boundary, and a position never learns to predict the first token of the next example.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import mxfp4
from .checkpoint import Checkpoint
from .config import FULL, SLIDING, GptOssConfig
from .experts import EXPERT_FORMATS, EXPERT_PROJS, Experts, apply_keeping
from .lora import LoraSettings
from .loss import target_logprobs, trained_targets

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex")
"""eager: the reference math; sdpa: fused on every device (CPU flash kernel on CPU, flex elsewhere);
flex: flex attention on any device (on CPU uncompiled, for tests: it materialises the scores)."""


@dataclass
class CausalLMOutput:
    hidden_states: torch.Tensor | None = None
    """[B, T, H] after the final norm: what the lm_head reads."""
    logits: torch.Tensor | None = None
    """[B, T, V]: without labels, or with `return_logits=True` (never needed to train)."""
    token_logprobs: torch.Tensor | None = None
    """With labels: log-probabilities `[n]` (fp32) of the n trained targets (`model.loss`), in the
    order of `trained`'s True entries; every objective (SFT, DPO, GRPO) is computed from these."""
    trained: torch.Tensor | None = None
    """With labels: `[B, T-1]` bool, which positions are trained targets (`model.loss.trained_targets`)."""
    loss: torch.Tensor | None = None
    """With labels: mean cross-entropy over the trained targets, `-token_logprobs.mean()`."""
    n_tokens: int = 0
    """Number of trained targets behind `loss` (for exact gradient accumulation)."""
    aux_loss: torch.Tensor | None = None
    """Router load-balancing loss (with `return_aux_loss=True`); the trainer adds coef * aux_loss."""


# -- norms and rotary embeddings ------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype (OpenAI reference and HF both do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Per-frequency inverse wavelengths `[head_dim / 2]` (float64) and the cos/sin scale.

    YaRN (arXiv:2309.00071 §3.2, "NTK-by-parts"): frequencies that rotate fewer than beta_slow times
    over the original context are interpolated (divided by `factor`), those rotating more than
    beta_fast times are kept, with a linear ramp in between; cos/sin are scaled by the paper's
    attention temperature `0.1 ln(factor) + 1` ("concentration" in OpenAI's reference).
    """
    d = config.head_dim
    base = config.rope_theta
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)  # [d/2] wavelengths / 2pi
    rs = config.rope_scaling or {}
    factor = float(rs.get("factor") or 1.0)
    if rs.get("rope_type", "yarn") != "yarn" or factor <= 1.0:
        return 1.0 / freq, 1.0
    original = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32.0), float(rs.get("beta_slow") or 1.0)

    def dim_for(rotations: float) -> float:  # the dim index whose frequency turns `rotations` times
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if rs.get("truncate", True):  # HF's default; gpt-oss sets truncate=False
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    return inv_freq, 0.1 * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin `[B, T, head_dim/2]` for given positions; no buffers (cheap, and meta-device safe)."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        inv_freq, self.scale = yarn_inv_freq(config)
        self.inv_freq = inv_freq.tolist()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=position_ids.device)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # [B, T, d/2]
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, d]; half-split pairs (i, i + d/2) rotate together (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, d/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# -- attention -------------------------------------------------------------------------------------

def attention_masks(position_ids: torch.Tensor, config: GptOssConfig) -> dict[str, torch.Tensor]:
    """Boolean "may attend" masks `[B or 1, 1, T, T]` per layer kind, from the positions alone.

    An example starts where position_ids == 0; query i sees key j when both lie in the same example,
    j <= i, and on sliding layers i - j < sliding_window (the token itself and window - 1 before).
    """
    if (position_ids == position_ids[:1]).all():
        position_ids = position_ids[:1]  # one mask serves every row
    t = position_ids.shape[1]
    segment = (position_ids == 0).cumsum(-1)  # [B, T]
    idx = torch.arange(t, device=position_ids.device)
    dist = idx[:, None] - idx[None, :]  # [T, T]: query - key
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    full = same & (dist >= 0)
    sliding = full & (dist < config.sliding_window)
    return {FULL: full.unsqueeze(1), SLIDING: sliding.unsqueeze(1)}


class KVCache:
    """Keys and values of every token processed so far, per layer, for incremental decoding.

    Layer i holds `k, v [B, nKV, S, d]` after RoPE and before the GQA repeat. Pass one (empty) cache
    to every forward of a generation: the first call fills it with the prompt, each later call
    appends the new tokens. Rows of a batch share positions (no left padding).
    """

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Tokens seen so far."""
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's `k, v [B, nKV, T, d]`; returns all keys and values so far."""
        if layer_idx in self.layers:
            k0, v0 = self.layers[layer_idx]
            k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        self.layers[layer_idx] = (k, v)
        return k, v


def cached_attention_masks(t: int, past: int, config: GptOssConfig, device=None) -> dict[str, torch.Tensor]:
    """"May attend" masks `[1, 1, T, past + T]` for T new tokens after `past` cached ones: the same
    rules as `attention_masks` for one unpacked sequence (causal; window on sliding layers)."""
    q = torch.arange(past, past + t, device=device)
    dist = q[:, None] - torch.arange(past + t, device=device)[None, :]  # query - key
    full = dist >= 0
    return {FULL: full[None, None], SLIDING: (full & (dist < config.sliding_window))[None, None]}


def eager_attention(q, k, v, sinks, allowed, scale):
    """The reference: q [B, nH, T, d], k/v [B, nH, S, d] (kv already repeated), sinks [nH], allowed bool mask.

    The sink is one extra logit per head in the softmax denominator with no value (OpenAI reference
    `sdpa`): probabilities over real keys sum to less than one.
    """
    b, nh, t, _ = q.shape
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, nH, T, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, nh, 1, 1).expand(b, nh, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v  # [B, nH, T, d]


@dataclass(frozen=True)
class SegmentMask:
    """`attention_masks`' rule for one layer kind without its `[T, S]` tensor: the fused CPU kernel
    runs over chunks of queries, and each chunk's additive bias is built from this and dropped.

    Query i (at key position `offset + i`) sees key j when both lie in the same example, j is not
    after it, and, with a window, fewer than `window` positions separate them. Built per chunk of c
    queries, the bias costs c x S instead of T x S (32 GiB of int64 distances alone at 64k tokens)."""

    segment: torch.Tensor
    """[B or 1, S] int: which packed example each key position belongs to."""
    window: int | None = None
    """Sliding layers' window (the token itself and window - 1 before); None on full layers."""
    offset: int = 0
    """Key position of the first query (cached tokens before it when generating)."""

    def key_range(self, q0: int, q1: int) -> tuple[int, int]:
        """Keys [lo, hi) that queries [q0, q1) may see: none after the last, none before the window."""
        hi = self.offset + q1
        lo = max(0, self.offset + q0 - self.window + 1) if self.window else 0
        return lo, hi

    def bias(self, q0: int, q1: int, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive bias `[B or 1, 1, q1 - q0, hi - lo]`: 0 where allowed, -inf elsewhere."""
        dev = self.segment.device
        qpos = torch.arange(self.offset + q0, self.offset + q1, device=dev, dtype=torch.int32)
        dist = qpos[:, None] - torch.arange(lo, hi, device=dev, dtype=torch.int32)[None, :]  # [c, S]
        ok = dist >= 0
        if self.window:
            ok &= dist < self.window
        del dist
        seg = self.segment
        ok = ok & (seg[:, self.offset + q0:self.offset + q1, None] == seg[:, None, lo:hi])  # [B, c, S]
        return torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill_(~ok, float("-inf")).unsqueeze(1)


def segment_masks(position_ids: torch.Tensor, config: GptOssConfig, past: int = 0) -> dict[str, SegmentMask]:
    """`attention_masks` as `SegmentMask`s (no `[T, T]` tensor): for the fused CPU kernel. With `past`
    cached tokens (generation), one unpacked sequence continues after them."""
    if past:
        segment = torch.zeros(1, past + position_ids.shape[1], dtype=torch.int32, device=position_ids.device)
    else:
        if (position_ids == position_ids[:1]).all():
            position_ids = position_ids[:1]  # one mask serves every row
        segment = (position_ids == 0).cumsum(-1, dtype=torch.int32)  # [B, T]
    return {FULL: SegmentMask(segment, None, past), SLIDING: SegmentMask(segment, config.sliding_window, past)}


class _SinkFlashAttentionCPU(torch.autograd.Function):
    """Fused attention with sinks on PyTorch's CPU flash kernel, which returns the log-sum-exp.

    With a sink logit s, softmax over [scores, s] gives the sink-free output times
    sigmoid(lse - s) = exp(lse - lse'), lse' = logaddexp(lse, s) (docs/ARCHITECTURE.md §6). Backward is the
    kernel's own backward run with lse' and the sinked output: it then recomputes the sinked
    probabilities exp(S - lse') and D = rowsum(dO * O) of the sinked softmax, which is exactly the
    gradient of softmax-with-sink. The sink's own gradient is -sum_rows p_sink * rowsum(dO * O).

    The kernel runs over chunks of `chunk` queries against the keys they may see (`SegmentMask`):
    the masks never exist at `[T, T]`, and sliding layers skip keys outside the window.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask: SegmentMask, scale, chunk: int):
        b, _, t, _ = q.shape
        y = torch.empty_like(q)
        lse_dtype = torch.promote_types(q.dtype, torch.float32)  # the kernel's: fp32, or fp64 for fp64
        lse_all = q.new_empty(q.shape[:3], dtype=lse_dtype)  # [B, nH, T]
        s = sinks.to(lse_dtype).view(1, -1, 1)
        for q0 in range(0, t, chunk):
            q1 = min(t, q0 + chunk)
            lo, hi = mask.key_range(q0, q1)
            bias = mask.bias(q0, q1, lo, hi, q.dtype).expand(b, 1, q1 - q0, hi - lo)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], 0.0, False, attn_mask=bias, scale=scale)
            la = torch.logaddexp(lse, s)
            y[:, :, q0:q1] = out * torch.exp(lse - la).unsqueeze(-1).to(out.dtype)
            lse_all[:, :, q0:q1] = la
        ctx.save_for_backward(q, k, v, sinks, y, lse_all)
        ctx.mask, ctx.scale, ctx.chunk = mask, scale, chunk
        return y

    @staticmethod
    def backward(ctx, grad):
        q, k, v, sinks, y, lse_all = ctx.saved_tensors
        mask, b, t = ctx.mask, q.shape[0], q.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dsinks = torch.zeros(q.shape[1], dtype=lse_all.dtype, device=q.device)
        for q0 in range(0, t, ctx.chunk):
            q1 = min(t, q0 + ctx.chunk)
            lo, hi = mask.key_range(q0, q1)
            bias = mask.bias(q0, q1, lo, hi, q.dtype).expand(b, 1, q1 - q0, hi - lo)
            g, yc, la = grad[:, :, q0:q1].contiguous(), y[:, :, q0:q1].contiguous(), lse_all[:, :, q0:q1].contiguous()
            dqc, dkc, dvc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], yc, la, 0.0, False, attn_mask=bias,
                scale=ctx.scale)
            dq[:, :, q0:q1] = dqc
            dk[:, :, lo:hi] += dkc
            dv[:, :, lo:hi] += dvc
            p_sink = torch.exp(sinks.to(la.dtype).view(1, -1, 1) - la)  # [B, nH, c]
            dsinks -= (p_sink * (g.to(la.dtype) * yc.to(la.dtype)).sum(-1)).sum((0, 2))
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None


def flex_block_masks(position_ids: torch.Tensor, config: GptOssConfig, block: int = 128) -> dict:
    """`attention_masks` as flex attention `BlockMask`s: same rules, but tiles that no query may
    see (outside the window, across packed examples) are skipped, never computed.

    The tiles are classified from per-tile bounds (first and last position and example of each
    block of `block` tokens), never from a `[T, T]` mask: `create_block_mask` evaluates the rule
    at every (query, key) pair (16 GiB of booleans, and int64 temporaries, at 128k tokens). A tile
    is full (no mask applied) when every pair in it is allowed, partial (the rule applied per
    element) when some may be; partial is conservative, full is exact."""
    from torch.nn.attention.flex_attention import BlockMask

    if (position_ids == position_ids[:1]).all():
        position_ids = position_ids[:1]  # one mask serves every row
    t = position_ids.shape[1]
    segment = (position_ids == 0).cumsum(-1)  # [B, T], nondecreasing along T
    window = config.sliding_window
    dev = position_ids.device
    first = torch.arange(0, t, block, device=dev)  # [nb]
    last = (first + block).clamp(max=t) - 1
    whole = (last - first + 1) == block  # a tile cut by the end is never full
    seg_first, seg_last = segment[:, first], segment[:, last]  # [B, nb]
    qf, ql, kf, kl = first[:, None], last[:, None], first[None, :], last[None, :]
    # some pair may share an example / every pair does (examples are contiguous runs)
    share = (seg_first[:, None, :] <= seg_last[:, :, None]) & (seg_last[:, None, :] >= seg_first[:, :, None])
    one = (seg_first == seg_last)
    share_all = one[:, :, None] & one[:, None, :] & (seg_first[:, :, None] == seg_first[:, None, :])
    complete = whole[:, None] & whole[None, :]
    tiles = {FULL: (share & (kf <= ql), share_all & (kl <= qf) & complete)}
    tiles[SLIDING] = (tiles[FULL][0] & (qf - kl < window), tiles[FULL][1] & (ql - kf < window))

    def full(bi, h, qi, ki):
        return (qi >= ki) & (segment[bi, qi] == segment[bi, ki])

    def sliding(bi, h, qi, ki):
        return full(bi, h, qi, ki) & (qi - ki < window)

    def kv_blocks(allowed: torch.Tensor):  # [B, nq, nk] bool -> counts [B, 1, nq], indices [B, 1, nq, nk]
        order = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True)  # allowed tiles first, in order
        return allowed.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    masks = {}
    for kind, fn in ((FULL, full), (SLIDING, sliding)):
        some, every = tiles[kind]
        masks[kind] = BlockMask.from_kv_blocks(*kv_blocks(some & ~every), *kv_blocks(every), BLOCK_SIZE=block,
                                               mask_mod=fn, seq_lengths=(t, t))
    return masks


_COMPILED_FLEX = None


def _flex(device: torch.device):
    """flex_attention, compiled on accelerators (its fused kernels exist only compiled); uncompiled on
    CPU, where it is the math reference (tests) and the flash kernel does the real work."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_sink_attention(q, k, v, sinks, block_mask, scale):
    """q [B, nH, T, d], k/v [B, nKV, T, d] (GQA without repeating kv): the sink-free flex output
    times sigmoid(lse - s) (docs/ARCHITECTURE.md §6); autograd differentiates through lse (flex supports it)."""
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = _flex(q.device)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                               return_aux=AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))  # [B, nH, T]: share not taken by the sink
    return out * keep.unsqueeze(-1).to(out.dtype)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, *, device=None, dtype=None):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        kw = dict(bias=config.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(h, self.num_heads * d, **kw)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, **kw)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, **kw)
        self.o_proj = nn.Linear(self.num_heads * d, h, **kw)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, device=device, dtype=dtype))
        self.kind = SLIDING if config.is_sliding(layer_idx) else FULL
        self.scale = d ** -0.5
        self.layer_idx = layer_idx

    query_chunk = 512
    """Queries per call of the fused CPU kernel: each call's bias is query_chunk x keys (`SegmentMask`)."""

    def forward(self, x, cos, sin, masks: dict, impl: str, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        # GQA: query head j reads kv head j // (nH / nKV).
        rep = self.num_heads // self.num_kv_heads
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, d]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, nKV, S, d]: the cached tokens, then these
        mask = masks[self.kind]
        if impl == "flex":
            out = flex_sink_attention(q, k, v, self.sinks, mask, self.scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if impl == "sdpa":
            out = _SinkFlashAttentionCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), self.sinks, mask,
                                               self.scale, self.query_chunk)
        else:
            out = eager_attention(q, k, v, self.sinks, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


# -- MoE and the decoder layer -----------------------------------------------------------------------

class MLPBlock(nn.Module):
    def __init__(self, config: GptOssConfig, *, experts: str, device=None, dtype=None):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True, device=device, dtype=dtype)
        self.experts = Experts(config, fmt=experts, device=device, dtype=dtype)
        self.chunk_size: int | None = None
        """Tokens per MoE chunk (`GptOssForCausalLM.moe_chunking`); None: the whole batch at once."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (y [B, T, H], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        if not self.chunk_size or flat.shape[0] <= self.chunk_size:
            y, logits = self._route(flat)
            return y.view_as(x), logits
        # Each chunk under its own checkpoint: backward keeps only the chunk's input (a view of x)
        # and recomputes its routing and experts, so no [tokens, intermediate] tensor of the whole
        # batch exists in forward or backward. Under layer checkpointing the MoE forward runs three
        # times (forward, the layer's recompute, the chunk's recompute): compute for memory.
        grad = torch.is_grad_enabled()
        parts = [checkpoint(self._route, part, use_reentrant=False) if grad else self._route(part)
                 for part in flat.split(self.chunk_size)]
        return torch.cat([y for y, _ in parts]).view_as(x), torch.cat([logits for _, logits in parts])

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N, H] -> (y [N, H], router logits [N, E])."""
        logits = self.router(flat)  # [N, E]
        top, idx = torch.topk(logits, self.top_k, dim=-1, sorted=True)  # [N, k]
        weights = torch.softmax(top.float(), dim=-1).to(flat.dtype)  # softmax over the chosen k only
        return self.experts(flat, idx, weights), logits


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, *, experts: str, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, layer_idx, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLPBlock(config, experts=experts, **kw)

    def forward(self, x, cos, sin, masks, impl, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, impl, cache)
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + y, router_logits


class Embedding(nn.Embedding):
    """nn.Embedding whose frozen table can stay in CPU memory (`offload`) when the model moves to an
    accelerator: a batch's rows are gathered there and only they are copied over (T x H values)."""

    offloaded = False

    def offload(self) -> None:
        if self.weight.requires_grad:
            raise ValueError("a trained embedding cannot be offloaded (freeze it first: LoRA runs do)")
        self.weight.data = self.weight.data.to("cpu")
        self.offloaded = True

    def _apply(self, fn, recurse=True):
        return apply_keeping(self, self._parameters, ("weight",) if self.offloaded else (), fn, recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.offloaded:
            return super().forward(input_ids)
        return F.embedding(input_ids.to(self.weight.device), self.weight).to(input_ids.device)


class GptOssModel(nn.Module):
    def __init__(self, config: GptOssConfig, *, experts: str, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, experts=experts, **kw) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.rotary = RotaryEmbedding(config)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (arXiv:2101.03961 eqs. 4-6), pooled over layers as
    transformers' `load_balancing_loss_func` does: E * sum_e f_e * P_e, where f_e is the share of
    top-k slots routed to e (over the full softmax's top-k) and P_e its mean router probability."""
    counts = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    rows = 0
    for logits in router_logits:  # [N, E] per layer
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = counts + torch.bincount(chosen, minlength=num_experts).float()
        prob_sum = prob_sum + probs.sum(0)
        rows += logits.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


class OffloadedSaves(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep what is saved under them in CPU memory until backward needs it.

    Entered around each checkpointed decoder layer, they hold the layer's inputs: checkpointing saves
    them (outside its own hooks) and recomputes everything else, so with these the accelerator keeps
    no [tokens, hidden] tensor per layer between forward and backward. A tensor already in CPU memory
    is kept as it is (no copy): on a CPU run the hooks run and change nothing. Copies go to pinned
    memory when CUDA is present, synchronously (as `torch.autograd.graph.save_on_cpu` does)."""

    def __init__(self):
        self.packed = 0
        """Tensors packed so far (what tests check to see that the path ran)."""
        self.offloaded_bytes = 0
        """Bytes of those that were copied to CPU memory (0 on a CPU run)."""
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        self.packed += 1
        if t.device.type == "cpu":
            return None, t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=torch.cuda.is_available())
        host.copy_(t)
        self.offloaded_bytes += t.numel() * t.element_size()
        return t.device, host

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        device, t = packed
        return t if device is None else t.to(device, non_blocking=True)


class GptOssForCausalLM(nn.Module):
    """gpt-oss with HF parameter names; `experts` "mxfp4" (frozen MXFP4 buffers) or "dequantized" (dense)."""

    logits_chunk_size = 256
    """Labeled rows per chunk of the loss: at V = 201088 one chunk is 0.2 GB of fp32 logits, plus
    0.1 GB for each bf16 copy on GPU; 256 rows still keep the V-wide matmuls efficient."""

    def __init__(self, config: GptOssConfig, *, experts: str = "dequantized", attn_implementation: str = "sdpa",
                 device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.model = GptOssModel(config, experts=experts, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = False
        self.activation_offload: OffloadedSaves | None = None
        """With gradient checkpointing and `offload_to_cpu`: the hooks holding the layer inputs."""
        self.lora_settings: LoraSettings | None = None
        """The LoRA adapters attached by `model.lora.add_lora` (None without adapters)."""

    # -- switches ---------------------------------------------------------------------------------
    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, impl: str) -> None:
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {impl!r}")
        self._attn_implementation = impl

    def gradient_checkpointing_enable(self, *, offload_to_cpu: bool = False) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations; with
        `offload_to_cpu`, the layer inputs that checkpointing keeps wait in CPU memory (`OffloadedSaves`)."""
        self.gradient_checkpointing = True
        self.activation_offload = OffloadedSaves() if offload_to_cpu else None

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False
        self.activation_offload = None

    def moe_chunking(self, tokens: int | None) -> None:
        """Run every MoE block over chunks of `tokens` tokens, each checkpointed (`MLPBlock.forward`);
        None: the whole batch at once. Same outputs and gradients, bounded MoE activations."""
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"moe_chunking takes a positive number of tokens or None, got {tokens!r}")
        for layer in self.model.layers:
            layer.mlp.chunk_size = tokens

    def _impl_for(self, x: torch.Tensor, cache: KVCache | None) -> str:
        impl = self._attn_implementation
        if impl == "sdpa" and x.device.type != "cpu":
            impl = "flex"  # PyTorch's flash kernels take no mask; flex takes windows and packing
        if impl == "flex" and cache is not None:
            return "eager"  # decoding: a few new queries against the cache, where eager is cheap
        return impl

    def offload(self, *, embeddings: bool = False, expert_layers: int = 0) -> list[int]:
        """Keep frozen weights in CPU memory when the model moves to an accelerator (call before
        `.to()` / accelerate's prepare): the input embedding table (a row gather per batch), and the
        MXFP4 experts of `expert_layers` decoder layers, spread evenly over the depth, copied over
        expert by expert when used. Returns the offloaded layers' indices. `gptoss-ft plan` counts
        what each saves; docs/ARCHITECTURE.md §6."""
        n = self.config.num_hidden_layers
        if not 0 <= expert_layers <= n:
            raise ValueError(f"expert_layers must be between 0 and {n}, got {expert_layers}")
        if embeddings:
            if self.config.tie_word_embeddings:
                raise ValueError("tied embeddings are the lm_head too; they cannot be offloaded")
            self.model.embed_tokens.offload()
        layers = sorted({i * n // expert_layers for i in range(expert_layers)}) if expert_layers else []
        for i in layers:
            self.model.layers[i].mlp.experts.offload()
        return layers

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, return_aux_loss: bool = False,
                return_logits: bool | None = None, logits_to_keep: int = 0,
                cache: KVCache | None = None) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] aligned with input_ids (shifted here; -100 ignored);
        position_ids [B, T] (default arange; restart at 0 where a packed example begins).
        Returns the final hidden states; with labels the trained targets' log-probabilities and
        their mean cross-entropy (`model.loss`: logits only at those rows, in chunks); logits
        `[B, T, V]` without labels or when `return_logits` is true; logits_to_keep=k > 0: only the
        last k positions' (`[B, k, V]`; generation needs one).
        cache: a `KVCache` for generation; input_ids are then the tokens after those it holds, and
        positions continue from there (no packing)."""
        b, t = input_ids.shape
        past = len(cache) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        impl = self._impl_for(x, cache)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        if impl == "flex":
            masks = flex_block_masks(position_ids, self.config)
        elif impl == "sdpa":  # chunks of queries, each with its own small bias
            masks = segment_masks(position_ids, self.config, past)
        elif cache is None:
            masks = attention_masks(position_ids, self.config)
        else:
            masks = cached_attention_masks(t, past, self.config, device=x.device)
        router_logits = []
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                with self.activation_offload or contextlib.nullcontext():
                    x, logits = checkpoint(layer, x, cos, sin, masks, impl, use_reentrant=False)
            else:
                x, logits = layer(x, cos, sin, masks, impl, cache)
            router_logits.append(logits)
        x = self.model.norm(x)
        out = CausalLMOutput(hidden_states=x)
        if return_aux_loss:
            out.aux_loss = load_balancing_loss(router_logits, self.config.num_local_experts,
                                               self.config.num_experts_per_tok)
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)  # [B, T or k, V]
        if labels is not None:
            out.trained = trained_targets(labels, position_ids)
            out.token_logprobs = target_logprobs(x[:, :-1][out.trained], self.lm_head.weight,
                                                 labels[:, 1:][out.trained], chunk=self.logits_chunk_size)
            out.n_tokens = out.token_logprobs.numel()
            # no targets: a zero that still reaches every parameter, so DDP's hooks fire
            out.loss = -out.token_logprobs.mean() if out.n_tokens else x.sum() * 0.0
        return out

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.bfloat16, experts: str = "mxfp4",
                        device="cpu", attn_implementation: str = "sdpa") -> "GptOssForCausalLM":
        """An HF directory (MXFP4 or dense experts), an original-layout directory, an HF directory
        with `original/`, or a hub id. experts="mxfp4" keeps experts as frozen MXFP4 buffers (a dense
        checkpoint is quantized on load, bit-exact when its values came from MXFP4); "dequantized"
        gives dense trainable experts. Floating-point parameters come back with requires_grad=True."""
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
        ckpt = Checkpoint(path)
        ckpt.validate()
        config = ckpt.config
        with torch.device("meta"):
            model = cls(config, experts=experts, attn_implementation=attn_implementation, dtype=dtype)
        state, quantized = {}, {}
        for name in model.state_dict():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            state[name] = _load_tensor(ckpt, name, experts, dtype, quantized).to(device)
        model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model


def _load_tensor(ckpt: Checkpoint, name: str, experts: str, dtype: torch.dtype, quantized: dict) -> torch.Tensor:
    """One state-dict entry from the checkpoint, converting expert storage when the formats differ
    (`quantized` holds the (blocks, scales) of a dense projection between its two entries)."""
    parts = name.split(".")
    if "experts" in parts:
        layer, leaf = int(parts[2]), parts[-1]
        if experts == "dequantized" and leaf in EXPERT_PROJS:
            return ckpt.get_expert_weight(layer, leaf, dtype)  # [E, in, out]
        if experts == "mxfp4" and ckpt.experts_format == "dequantized" and leaf.endswith(("_blocks", "_scales")):
            proj, kind = leaf.rsplit("_", 1)
            dense_name = name.rsplit(".", 1)[0] + "." + proj
            if dense_name not in quantized:
                dense = ckpt.get(dense_name, torch.float32)  # [E, in, out]
                quantized[dense_name] = mxfp4.quantize(dense.transpose(1, 2))  # blocks of 32 along `in`
            blocks, scales = quantized[dense_name] if kind == "blocks" else quantized.pop(dense_name)
            return blocks if kind == "blocks" else scales
    return ckpt.get(name, dtype, own=True)  # the model's weights must not pin the file mapping


def from_pretrained(path, *, dtype: torch.dtype = torch.bfloat16, experts: str = "mxfp4", device="cpu",
                    attn_implementation: str = "sdpa") -> GptOssForCausalLM:
    """`model.from_pretrained`: see `GptOssForCausalLM.from_pretrained`."""
    return GptOssForCausalLM.from_pretrained(path, dtype=dtype, experts=experts, device=device,
                                             attn_implementation=attn_implementation)
