"""Expert MLPs of the gpt-oss MoE block: dense trainable, or frozen MXFP4 with optional per-expert LoRA.

One module, `Experts`, with the HF names (docs/ARCHITECTURE.md §4) so checkpoints load with zero renames:

    dense ("dequantized"):  gate_up_proj [E, H, 2I], down_proj [E, I, H]          (HF layout: [E, in, out])
    frozen MXFP4 ("mxfp4"): gate_up_proj_blocks [E, 2I, H/32, 16] + _scales [E, 2I, H/32],
                            down_proj_blocks [E, H, I/32, 16] + _scales [E, H, I/32]   (uint8 buffers, [E, out, in])
    both:                   gate_up_proj_bias [E, 2I], down_proj_bias [E, H]      (trainable parameters)

Routing sorts the (token, slot) pairs by expert and runs one matmul per contiguous group: no per-token
loop and no tokens x experts x k one-hot (docs/ARCHITECTURE.md §6). MXFP4 weights are decoded per expert that the
batch hits, inside forward, and decoded again in backward (`_MxFP4Matmul`): no dequantized copy of
an expert outlives the matmul that needs it.

Expert LoRA is stored exactly as PEFT's `target_parameters` writes it for transformers' GptOss
(verified against peft 0.21: `LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])` nests two `ParamWrapper`s, down_proj outside, so gate_up's factors live
under `mlp.experts.base_layer.` and down's under `mlp.experts.`):

    lora_A.weight [r*E, in]   expert e uses rows    e*r .. e*r+r-1        (A.view(E, r, in)[e])
    lora_B.weight [out, r*E]  expert e uses columns j*E + e, j < r         (B.view(out, r, E)[:, :, e])

and the update for expert e is `x @ W_e + scaling * (x @ A_e^T) @ B_e^T`, scaling = alpha / r
(PEFT `ParamWrapper.get_delta_weight`). We compute it as two thin matmuls per expert group and never
form `B A` for all experts, which is what makes PEFT's expert LoRA slow and memory-hungry.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from . import mxfp4

SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid slope (OpenAI reference `swiglu`, HF `GptOssExperts.alpha`)
EXPERT_PROJS = ("gate_up_proj", "down_proj")
EXPERT_FORMATS = ("mxfp4", "dequantized")
"""How experts are stored, in a model (`model.experts`) and in a checkpoint: frozen MXFP4
`_blocks`/`_scales` bytes, or dequantized (dense, bf16 in a checkpoint) weights."""
_MXFP4_BUFFERS = tuple(f"{p}_{part}" for p in EXPERT_PROJS for part in ("blocks", "scales"))


def swiglu_reference(h: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved `h [..., 2I]` (even = gate, odd = up) -> `[..., I]`.

    The gate is clamped from above only, up on both sides, and up gets +1 (OpenAI reference model.py).
    """
    gate = h[..., 0::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1)


class _ClampedSwiGLU(torch.autograd.Function):
    """`swiglu_reference` that saves only its input and recomputes in backward.

    Plain autograd would keep four `[n, I]` intermediates per expert group (clamped gate, sigmoid,
    glu, up + 1); this keeps `h` alone, the same tensor the next matmul needs anyway.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.limit = limit
        return swiglu_reference(h, limit)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            out = swiglu_reference(h, ctx.limit)
        (dh,) = torch.autograd.grad(out, h, grad)
        return dh, None


class _MxFP4Matmul(torch.autograd.Function):
    """`x [n, in] @ W^T` with `W [out, in]` stored as MXFP4; W is frozen, so only x gets a gradient.

    The decoded W is a temporary in forward and decoded again in backward (docs/ARCHITECTURE.md §6: recompute
    instead of saving); autograd keeps only references to the uint8 buffers.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(blocks, scales)  # offloaded experts: the CPU tensors, copied again in backward
        w = _decode_scratch(blocks, scales, x)  # [out, in]
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        blocks, scales = ctx.saved_tensors
        w = _decode_scratch(blocks, scales, grad)  # [out, in]
        return grad @ w, None, None


def _decode_on(blocks: torch.Tensor, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One expert's MXFP4 bytes decoded on `like`'s device in its dtype; bytes kept in (pinned) CPU
    memory by `Experts.offload` are copied over first (a no-op when they already live there)."""
    blocks = blocks.to(like.device, non_blocking=True)
    scales = scales.to(like.device, non_blocking=True)
    return mxfp4.dequantize(blocks, scales, like.dtype)


_SCRATCH = threading.local()


def _decode_scratch(blocks: torch.Tensor, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`_decode_on` for a weight used once and dropped (`_MxFP4Matmul`): on CPU into a buffer per
    shape and dtype that this thread reuses, valid until its next call for that shape. A fresh
    31.6 MiB buffer per decode at gpt-oss-20b's gate_up costs page faults each time under the
    trainer's fixed malloc mmap threshold (`finetune.trainer.return_freed_memory_to_the_os`):
    19 ms against 4 ms to allocate and fill; a full-size CPU step took 144 s instead of 104 s
    (scripts/full_size.py; 109 s with this buffer). CUDA's caching allocator reuses memory by itself."""
    if like.device.type != "cpu":
        return _decode_on(blocks, scales, like)
    shape = (*blocks.shape[:-2], blocks.shape[-2] * mxfp4.BLOCK)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((shape, like.dtype))
    if buf is None:
        buf = buffers[(shape, like.dtype)] = torch.empty(shape, dtype=like.dtype)
    return mxfp4.dequantize(blocks, scales, like.dtype, out=buf)


def apply_keeping(module: nn.Module, store: dict, names, fn, recurse: bool):
    """`nn.Module._apply` (what `.to()`, `.cuda()` and accelerate's placement run) with the tensors
    `names` of `store` (the module's `_parameters` or `_buffers`) left where they are: offloading."""
    kept = {name: store.pop(name) for name in names}
    try:
        return nn.Module._apply(module, fn, recurse)
    finally:
        store.update(kept)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scale of B A: alpha / r, or alpha / sqrt(r) for rsLoRA (arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_per_expert(a: torch.Tensor, b: torch.Tensor, num_experts: int):
    """PEFT-layout factors `a [r*E, in]`, `b [out, r*E]` -> (A_e [r, in] per e, B_e [out, r] per e).

    Views only; unbind's backward stacks the per-expert grads once instead of E full-size scatters.
    """
    r = a.shape[0] // num_experts
    return a.view(num_experts, r, -1).unbind(0), b.view(b.shape[0], r, num_experts).unbind(2)


def lora_delta(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The dense update `[E, in, out]` (HF layout), unscaled: `A_e^T B_e^T` for each e. Merging only."""
    r = a.shape[0] // num_experts
    return torch.einsum("eri,ore->eio", a.view(num_experts, r, -1), b.view(b.shape[0], r, num_experts))


class LoRAFactors(nn.Module):
    """Holds `lora_A` / `lora_B` so their state-dict names match PEFT's (`...base_layer.lora_A.weight`)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, *, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r * num_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * num_experts, out_features, bias=False, device=device, dtype=dtype)
        # PEFT's default init: A as nn.Linear (kaiming uniform, a=sqrt(5)), B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


class Experts(nn.Module):
    """The E expert MLPs of one layer; `fmt` "mxfp4" (frozen MXFP4 buffers) or "dequantized" (dense params)."""

    def __init__(self, config, *, fmt: str = "dequantized", device=None, dtype=None):
        super().__init__()
        if fmt not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {fmt!r}")
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.limit = config.swiglu_limit
        self.fmt = fmt
        if fmt == "dequantized":
            self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i, device=device, dtype=dtype))
            self.down_proj = nn.Parameter(torch.empty(e, i, h, device=device, dtype=dtype))
        else:
            u8 = dict(device=device, dtype=torch.uint8)
            self.register_buffer("gate_up_proj_blocks", torch.zeros(e, 2 * i, h // 32, 16, **u8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(e, 2 * i, h // 32, **u8))
            self.register_buffer("down_proj_blocks", torch.zeros(e, h, i // 32, 16, **u8))
            self.register_buffer("down_proj_scales", torch.zeros(e, h, i // 32, **u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i, device=device, dtype=dtype))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h, device=device, dtype=dtype))
        self.lora_scaling = 0.0  # the scale of B A once `add_lora` ran
        self.qat = False  # quantization-aware training: see `_qat_matmul`
        self.offloaded = False  # see `offload`

    # -- placement -------------------------------------------------------------------------------
    def offload(self) -> None:
        """Keep the frozen MXFP4 bytes in CPU memory (pinned when CUDA is present) when the module
        moves to an accelerator. Each expert a batch hits is copied over right before its decode, in
        forward and again in backward (autograd keeps the CPU tensors), so the accelerator never
        holds this layer's experts beyond one expert's matmul: memory for PCIe traffic."""
        if self.fmt != "mxfp4":
            raise ValueError("only frozen MXFP4 experts can be offloaded (model.experts: mxfp4)")
        for name in _MXFP4_BUFFERS:
            t = self._buffers[name].to("cpu")
            self._buffers[name] = t.pin_memory() if torch.cuda.is_available() else t
        self.offloaded = True

    def _apply(self, fn, recurse=True):
        names = _MXFP4_BUFFERS if self.offloaded else ()
        return apply_keeping(self, self._buffers, names, fn, recurse)

    # -- LoRA ------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return hasattr(self, "lora_A")

    def add_lora(self, r: int, alpha: float, *, use_rslora: bool = False) -> None:
        """Attach zero-initialised expert LoRA on gate_up_proj (`base_layer.lora_*`) and down_proj (`lora_*`)."""
        if self.has_lora:
            raise ValueError("experts already carry LoRA")
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        like = self.gate_up_proj_bias
        kw = dict(device=like.device, dtype=like.dtype)
        # PEFT's nesting: ParamWrapper(down_proj) wraps ParamWrapper(gate_up_proj) wraps GptOssExperts.
        self.base_layer = LoRAFactors(e, h, 2 * i, r, **kw)
        down = LoRAFactors(e, i, h, r, **kw)
        self.lora_A, self.lora_B = down.lora_A, down.lora_B
        self.lora_scaling = lora_scaling(r, alpha, use_rslora)

    @torch.no_grad()
    def set_lora(self, gate_up: tuple[torch.Tensor, torch.Tensor] | None,
                 down: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> None:
        """Load trained expert LoRA: (A [r*E, in], B [out, r*E]) per projection in PEFT's layout, None
        for a projection without (its factors become zero), and the scale of B A. Attaches LoRA of
        rank `A rows / E` first when the experts carry none."""
        if not self.has_lora:
            given = gate_up if gate_up is not None else down
            if given is None:
                raise ValueError("set_lora needs the factors of at least one projection to know the rank")
            self.add_lora(given[0].shape[0] // self.num_experts, 1.0)
        self.lora_scaling = scaling  # the trained scale as given, not one derived from a rank and alpha
        for holder, ab in ((self.base_layer, gate_up), (self, down)):
            if ab is None:
                holder.lora_A.weight.zero_()
                holder.lora_B.weight.zero_()
            else:
                holder.lora_A.weight.copy_(ab[0])
                holder.lora_B.weight.copy_(ab[1])

    def _lora_weights(self, proj: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.has_lora:
            return None
        holder = self.base_layer if proj == "gate_up_proj" else self
        return holder.lora_A.weight, holder.lora_B.weight

    def dense_weight(self, proj: str) -> torch.Tensor:
        """`proj` as a dense HF-layout tensor `[E, in, out]` without LoRA (a full decode for MXFP4)."""
        if self.fmt == "dequantized":
            return getattr(self, proj)
        w = _decode_on(getattr(self, proj + "_blocks"), getattr(self, proj + "_scales"), self.gate_up_proj_bias)
        return w.transpose(1, 2)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold LoRA into the weights and drop it. MXFP4 experts become dense ("dequantized") experts:
        the merged update is not representable in MXFP4 without requantizing (docs/ARCHITECTURE.md §6)."""
        if not self.has_lora:
            return
        dtype = self.gate_up_proj_bias.dtype
        merged = {p: self.dense_weight(p) + self.lora_scaling * lora_delta(*self._lora_weights(p), self.num_experts).to(dtype)
                  for p in EXPERT_PROJS}
        for p in EXPERT_PROJS:
            if self.fmt == "mxfp4":
                delattr(self, p + "_blocks")
                delattr(self, p + "_scales")
            else:
                delattr(self, p)
            setattr(self, p, nn.Parameter(merged[p].contiguous(), requires_grad=False))
        self.fmt = "dequantized"
        self.offloaded = False
        del self.base_layer, self.lora_A, self.lora_B
        self.lora_scaling = 0.0

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_idx [N, k] (long); expert_weight [N, k] -> [N, H] = sum_k w * expert(x)."""
        n_tokens, k = expert_idx.shape
        flat = expert_idx.reshape(-1)  # [N*k]: slot s belongs to token s // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        token = order // k  # [N*k], sorted by expert
        xs = x[token]  # [N*k, H]: each expert's tokens now contiguous
        w1, w2 = self._weights("gate_up_proj"), self._weights("down_proj")
        b1, b2 = self.gate_up_proj_bias.unbind(0), self.down_proj_bias.unbind(0)
        l1, l2 = (self._lora_weights(p) for p in EXPERT_PROJS)
        l1 = lora_per_expert(*l1, self.num_experts) if l1 is not None else None  # (A_e [r, H], B_e [2I, r])
        l2 = lora_per_expert(*l2, self.num_experts) if l2 is not None else None  # (A_e [r, I], B_e [H, r])
        outs = []
        # split, not slicing: a slice's backward writes a zero-filled [N*k, H] per expert, a split's
        # backward concatenates the group grads once.
        for e, xe in enumerate(xs.split(counts)):  # xe [n_e, H]
            if xe.shape[0] == 0:
                continue
            if self.qat:
                h = self._qat_matmul(xe, w1, l1, e) + b1[e]  # [n, 2I]
                a = _ClampedSwiGLU.apply(h, self.limit)  # [n, I]
                outs.append(self._qat_matmul(a, w2, l2, e) + b2[e])  # [n, H]
                continue
            h = self._matmul(xe, w1, e) + b1[e]  # [n, 2I]
            if l1 is not None:
                h = h + self.lora_scaling * ((xe @ l1[0][e].t()) @ l1[1][e].t())
            a = _ClampedSwiGLU.apply(h, self.limit)  # [n, I]
            y = self._matmul(a, w2, e) + b2[e]  # [n, H]
            if l2 is not None:
                y = y + self.lora_scaling * ((a @ l2[0][e].t()) @ l2[1][e].t())
            outs.append(y)
        ys = torch.cat(outs) * expert_weight.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # [N*k, H]
        return x.new_zeros(n_tokens, x.shape[-1]).index_add(0, token, ys)

    def _weights(self, proj: str):
        if self.fmt == "dequantized":
            return getattr(self, proj).unbind(0)  # E views [in, out]; backward stacks the grads once
        return getattr(self, proj + "_blocks"), getattr(self, proj + "_scales")

    def _matmul(self, x: torch.Tensor, weights, e: int) -> torch.Tensor:
        if self.fmt == "dequantized":
            return x @ weights[e]
        blocks, scales = weights
        return _MxFP4Matmul.apply(x, blocks[e], scales[e])

    def _qat_matmul(self, x: torch.Tensor, weights, lora, e: int) -> torch.Tensor:
        """QAT: `x @ fake_quant(W_e + scaling * A_e^T B_e^T)`, so training sees the MXFP4 rounding that
        export will apply and learns around it (straight-through gradient to W or the LoRA factors).

        The effective weight of each hit expert is formed (and kept for backward): QAT trades the
        memory savings of the thin LoRA path for weights that survive requantization.
        """
        if self.fmt == "dequantized":
            w = weights[e]  # [in, out]
        else:
            blocks, scales = weights
            w = _decode_on(blocks[e], scales[e], x).t()  # [in, out]
        if lora is not None:
            w = w + self.lora_scaling * (lora[0][e].t() @ lora[1][e].t())
        return x @ mxfp4.fake_quant(w, dim=-2)  # MXFP4 blocks run along the input dim

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_A.weight.shape[0] // self.num_experts}" if self.has_lora else ""
        return f"{self.fmt}, experts={self.num_experts}, hidden={self.hidden_size}, width={self.intermediate_size}{lora}"


def set_qat(model: nn.Module, enabled: bool = True) -> int:
    """Switch quantization-aware training on every `Experts` of `model`; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, Experts):
            m.qat = enabled
            n += 1
    return n
