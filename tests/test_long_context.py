"""Long context (issue 17): the MoE over sequence chunks, checkpointed layer inputs kept in CPU
memory, attention masks never built at T x T (CPU query chunks, flex tiles); the same losses and
gradients as the plain paths, bounded tensor sizes, the config keys, and the planner's terms (its
per-layer count against what autograd saves)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model
from finetune import config as cfglib
from finetune import plan as planlib
from finetune.trainer import load_model
from model.config import GptOssConfig, preset
from model.modeling import (
    Attention,
    GptOssForCausalLM,
    MLPBlock,
    OffloadedSaves,
    RotaryEmbedding,
    attention_masks,
    flex_block_masks,
    segment_masks,
)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward, recompute and backward)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def _wide_config(**kw) -> GptOssConfig:
    """Intermediate 4x hidden, so a [tokens, intermediate] tensor stands out from [tokens, hidden] ones."""
    base = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=4, sliding_window=16,
                vocab_size=512, quantization_config=preset("tiny").quantization_config)
    return GptOssConfig(**{**base, **kw})


def _mlp(experts: str, dtype: torch.dtype) -> MLPBlock:
    torch.manual_seed(0)
    block = MLPBlock(_wide_config(), experts=experts, dtype=dtype)
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, std=0.3)
    if experts == "mxfp4":
        for name, b in block.experts.named_buffers():
            b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8) if name.endswith("blocks")
                    else torch.randint(118, 122, b.shape, dtype=torch.uint8))
        block.experts.add_lora(4, 8.0)
        for p in block.experts.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return block


def _run(block: MLPBlock, x: torch.Tensor):
    x = x.detach().requires_grad_()
    block.zero_grad()
    y, logits = block(x)
    ((y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + logits.square().sum()).backward()
    return y.detach(), logits.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()
                                                 if p.grad is not None}


@pytest.mark.parametrize("experts, dtype", [("mxfp4", torch.float32), ("dequantized", torch.float64)])
def test_chunked_moe_equals_unchunked_and_never_holds_tokens_x_intermediate(experts, dtype):
    block = _mlp(experts, dtype)  # MXFP4 decodes to 16- and 32-bit floats
    t, chunk = 1024, 64
    x = torch.randn(1, t, block.experts.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    sizes = {}
    for size in (None, chunk, 100):  # 100: a last chunk shorter than the others
        block.chunk_size = size
        with LargestTensor() as seen:
            out = _run(block, x)
        sizes[size] = seen.most
        if size is None:
            want = out
            continue
        y, logits, dx, grads = out
        assert grads.keys() == want[3].keys() and len(grads) >= 4  # LoRA or dense experts, biases, router
        for name, (a, b) in {"y": (y, want[0]), "logits": (logits, want[1]), "dx": (dx, want[2]),
                             **{n: (g, want[3][n]) for n, g in grads.items()}}.items():
            # fp32: sums over 1024 tokens in another order agree to ~1e-5 of the tensor's scale
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    i, k = block.experts.intermediate_size, block.top_k
    assert sizes[None] >= t * i  # the plain path: [tokens * k, hidden] and [tokens, intermediate]-sized tensors
    assert sizes[chunk] <= chunk * k * 2 * i < t * i  # chunked: one chunk's gate_up output at most


def _tiny_model(**kw) -> GptOssForCausalLM:
    torch.manual_seed(0)
    m = GptOssForCausalLM(_wide_config(**kw), dtype=torch.float64)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def _loss_and_grads(m, ids, pos):
    m.zero_grad()
    out = m(ids, labels=ids, position_ids=pos, return_aux_loss=True)
    (out.loss + 0.01 * out.aux_loss).backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _packed(t: int):
    ids = torch.randint(0, 512, (1, t), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(t // 3), torch.arange(t - t // 3)]).unsqueeze(0)  # two packed examples
    return ids, pos


def test_offloaded_checkpointing_and_chunked_moe_give_the_plain_loss_and_gradients():
    m = _tiny_model()
    ids, pos = _packed(96)
    loss, grads = _loss_and_grads(m, ids, pos)
    m.gradient_checkpointing_enable(offload_to_cpu=True)
    m.moe_chunking(16)
    hooks = m.activation_offload
    loss2, grads2 = _loss_and_grads(m, ids, pos)
    assert loss2 == pytest.approx(loss, rel=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, msg=name)
    # the hooks held each checkpointed layer's tensor inputs (x, cos, sin); on CPU without copying
    assert hooks.packed == 3 * m.config.num_hidden_layers and hooks.offloaded_bytes == 0
    m.gradient_checkpointing_disable()
    assert m.activation_offload is None
    with pytest.raises(ValueError, match="positive number of tokens"):
        m.moe_chunking(0)


def test_offload_hooks_keep_cpu_tensors_and_hand_them_back():
    hooks = OffloadedSaves()
    w = torch.randn(5, requires_grad=True)
    with hooks:
        y = (w * w).sum()  # mul saves both inputs
    y.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    assert hooks.packed == 2 and hooks.offloaded_bytes == 0


def test_cpu_attention_runs_in_query_chunks_without_a_tokens_x_tokens_mask(monkeypatch):
    cfg = _wide_config()
    t = 256
    _, pos = _packed(t)
    torch.manual_seed(3)
    x = torch.randn(1, t, cfg.hidden_size, dtype=torch.float64)
    cos, sin = RotaryEmbedding(cfg)(pos, torch.float64)
    monkeypatch.setattr(Attention, "query_chunk", 32)
    for layer in (0, 1):  # sliding, then full attention
        attn = Attention(cfg, layer, dtype=torch.float64)
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
        results = {}
        for impl, masks in (("eager", attention_masks(pos, cfg)), ("sdpa", segment_masks(pos, cfg))):
            xi = x.clone().requires_grad_()
            attn.zero_grad()
            with LargestTensor() as seen:
                out = attn(xi, cos, sin, masks, impl)
                (out * out).sum().backward()
            results[impl] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}, seen.most)
        # the reference takes its softmax in fp32: agreement to fp32 precision
        pairs = {"out": (results["sdpa"][0], results["eager"][0]), "dx": (results["sdpa"][1], results["eager"][1]),
                 **{n: (results["sdpa"][2][n], g) for n, g in results["eager"][2].items()}}
        for name, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
        assert results["eager"][3] >= t * t  # the reference's scores
        assert results["sdpa"][3] < t * t // 2  # chunks: 32 queries x at most 256 keys, x heads in the kernel's own


def _cfg(tmp_path, overrides=()):
    (tmp_path / "train.jsonl").write_text("{}\n")
    return cfglib.from_dict({"model": {"path": str(tmp_path / "base"), "init_preset": "tiny"},
                             "data": {"train": str(tmp_path / "train.jsonl")}, "output_dir": str(tmp_path / "run")},
                            list(overrides))


@pytest.mark.parametrize("override, message", [
    ("model.moe_chunk_size=0", r"model.moe_chunk_size must be a positive number of tokens or null, got 0"),
    ("model.moe_chunk_size=-4", r"model.moe_chunk_size must be a positive number"),
    ("model.moe_chunk_size=many", r"model.moe_chunk_size: expected int or null, got 'many'"),
    ("model.offload_activations=yes please", r"model.offload_activations: expected"),
    ("model.offload_activations=true", r"needs model.gradient_checkpointing: true"),
])
def test_long_context_keys_validate(tmp_path, override, message):
    with pytest.raises(cfglib.ConfigError, match=message):
        _cfg(tmp_path, [override])


def test_trainer_builds_the_model_with_the_keys(tmp_path):
    model.write_random(tmp_path / "base", preset("tiny"), seed=0)
    cfg = _cfg(tmp_path, ["model.gradient_checkpointing=true", "model.offload_activations=true",
                          "model.moe_chunk_size=128"])
    m = load_model(cfg, torch.device("cpu"))
    assert m.gradient_checkpointing and m.activation_offload is not None
    assert {layer.mlp.chunk_size for layer in m.model.layers} == {128}
    plain = load_model(_cfg(tmp_path), torch.device("cpu"))
    assert plain.activation_offload is None and {layer.mlp.chunk_size for layer in plain.model.layers} == {None}


@pytest.mark.parametrize("targets", [("attention", "experts"), ("attention",), ("experts",)])
def test_planned_layer_activations_are_what_autograd_saves(targets):
    """`plan`'s per-token bytes of one decoder layer (fp32, CPU kernel) against the tensors autograd
    really keeps (saved-tensor hooks, one count per storage; weights, the layer input, cos and sin
    excluded: the plan counts those elsewhere)."""
    cfg = _wide_config(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16)
    torch.manual_seed(0)
    m = GptOssForCausalLM(cfg, experts="mxfp4", dtype=torch.float32)
    model.add_lora(m, r=4, alpha=8, targets=targets)
    for name, p in m.named_parameters():
        p.requires_grad_("lora" in name)
    t = 512
    pos = torch.arange(t)[None]
    x = torch.randn(1, t, cfg.hidden_size, requires_grad=True)
    cos, sin = m.model.rotary(pos, torch.float32)
    skip = {z.untyped_storage().data_ptr() for z in (*m.parameters(), *m.buffers(), x, cos, sin)}
    seen = {}

    def pack(z):
        ptr = z.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = z.untyped_storage().nbytes()
        return z

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z):
        m.model.layers[1](x, cos, sin, segment_masks(pos, cfg), "sdpa")
    act = planlib._activations(cfg, "cpu", 4, attention_trained="attention" in targets,
                               experts_trained="experts" in targets, lora_r=4)
    planned = (act["norms"] + act["attention"] + act["moe"]) * t
    assert planned == pytest.approx(sum(seen.values()), rel=0.01)


def _20b(seq_len, **kw):
    return planlib.plan("gpt-oss-20b", method="lora", seq_len=seq_len, gradient_checkpointing=True, **kw)


def test_planner_counts_offloaded_inputs_and_moe_chunks():
    t, chunk = 65536, 8192
    plain, off, both = _20b(t), _20b(t, offload_activations=True), _20b(t, offload_activations=True, moe_chunk_size=chunk)
    h, s = 2880, 2
    inputs = plain.breakdown["activations: checkpointed layer inputs (24 layers)"]
    assert inputs == 24 * h * s * t + 64 * s * t  # + cos and sin
    key = "activations: checkpointed layer inputs in CPU memory (on the GPU: one layer's)"
    assert off.breakdown[key] == h * s * t
    assert plain.peak_bytes - off.peak_bytes == inputs - h * s * t
    assert any("GiB of host memory" in n for n in off.notes)
    # chunks: the recomputed layer holds its MoE state and backward buffers for `chunk` tokens, not t
    act = planlib._activations(planlib.load_config("gpt-oss-20b"), "cuda", s, attention_trained=True,
                               experts_trained=True, lora_r=16)
    held = "activations: one layer recomputed in backward, still held"
    assert off.breakdown[held] == (act["norms"] + act["attention"] + act["moe"]) * t
    layer = (act["norms"] + act["attention"] + h * s) * t  # + the chunks' inputs (the norm's output)
    grads = 2 * h * s * t  # the layer output's gradient and the chunk inputs' gradients the split collects
    moments = [layer + act["moe"] * chunk + (act["moe_backward"] - h * s) * chunk + grads,  # a chunk's backward
               layer + grads + h * s * t,  # those gradients joined
               (act["attention"] + act["attention_backward"]) * t]  # the attention's backward
    b = both.breakdown
    assert b[held + f" (MoE in chunks of {chunk})"] + b["activation gradients and backward buffers (one layer)"] == \
        max(moments)
    assert both.peak_bytes < off.peak_bytes < plain.peak_bytes
    assert _20b(t, moe_chunk_size=4096).peak_bytes <= _20b(t, moe_chunk_size=16384).peak_bytes
    assert _20b(4096, moe_chunk_size=8192).peak_bytes == pytest.approx(_20b(4096).peak_bytes, rel=0.01)
    # on CPU nothing moves: the same plan
    cpu = dict(device="cpu", seq_len=8192, gradient_checkpointing=True)
    assert planlib.plan("gpt-oss-20b", **cpu, offload_activations=True).peak_bytes == \
        planlib.plan("gpt-oss-20b", **cpu).peak_bytes
    with pytest.raises(planlib.PlanError, match="needs --gradient-checkpointing"):
        planlib.plan("gpt-oss-20b", offload_activations=True)
    with pytest.raises(planlib.PlanError, match="moe-chunk-size must be a positive"):
        planlib.plan("gpt-oss-20b", moe_chunk_size=0)


def test_20b_lora_at_128k_plans_under_80_gib_with_the_long_context_keys(tmp_path, capsys):
    from finetune.cli import main as cli

    assert _20b(131072, offload_activations=True, moe_chunk_size=8192).peak_bytes < 80 * 2 ** 30
    assert cli(["plan", "--model", "gpt-oss-20b", "--seq-len", "131072", "--gradient-checkpointing",
                "--offload-activations", "--moe-chunk-size", "8192", "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["offload_activations"] and out["moe_chunk_size"] == 8192 and out["peak_gib"] < 80
    cfg = _cfg(tmp_path, ["model.gradient_checkpointing=true", "model.offload_activations=true",
                          "model.moe_chunk_size=8192", "data.max_seq_len=131072"])
    kw = planlib.config_kwargs(cfg)
    assert kw["offload_activations"] and kw["moe_chunk_size"] == 8192


@pytest.mark.parametrize("t, starts", [(320, [0, 100]), (384, [0, 128, 300]), (256, [0]), (129, [0, 5])])
def test_flex_block_masks_classify_tiles_as_create_block_mask_without_a_tokens_x_tokens_mask(t, starts):
    from torch.nn.attention.flex_attention import create_block_mask

    cfg = preset("tiny").replace(sliding_window=150)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:] + [t])])[None]
    with LargestTensor() as seen:
        got = flex_block_masks(pos, cfg)
    assert seen.most < t * t // 16  # tiles of 128: [B, T/128, T/128] at most, never [T, T]
    allowed = attention_masks(pos, cfg)
    for kind, mask in got.items():
        want = create_block_mask(lambda b, h, q, k, a=allowed[kind][0, 0]: a[q, k], None, None, t, t)
        torch.testing.assert_close(mask.to_dense(), want.to_dense())  # the tiles computed
        assert mask.full_kv_num_blocks.sum() == want.full_kv_num_blocks.sum()  # the tiles computed without the rule
