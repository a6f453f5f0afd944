"""Our GptOssForCausalLM against transformers' on the same tiny random checkpoints (fp32, CPU).

The checkpoints are "sharpened" (large q/k and router weights) so attention is peaked and routing is
decisive: sinks, the sliding window, GQA and routing then move the logits far beyond the tolerance,
which the sensitivity tests assert, so the parity tests can fail.
"""

import pytest
import torch

import model
from model.checkpoint import random_tensors, save
from model.config import preset
from model.modeling import GptOssForCausalLM, attention_masks

REL_TOL = 2e-4
T = 40  # longer than the tiny sliding window (16)


def _sharp_tensors(config, seed=0):
    for name, t in random_tensors(config, seed=seed, dtype=torch.float32):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = t * 12
        elif name.endswith("router.weight"):
            t = t * 20
        elif name.endswith("sinks"):
            t = t * 2
        yield name, t


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """The same sharpened tiny weights as HF (MXFP4), HF (dense experts) and original layout."""
    root = tmp_path_factory.mktemp("sharp")
    cfg = preset("tiny")
    tensors = list(_sharp_tensors(cfg))
    hf = save(root / "hf", cfg, tensors)
    orig = save(root / "orig", cfg, tensors, layout="original")
    dense_cfg = cfg.replace(quantization_config=None)
    dense = []
    for name, t in tensors:
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            proj = name[: -len("_blocks")]
            scales = dict(tensors)[proj + "_scales"]
            t = model.mxfp4.dequantize(t, scales, torch.float32).transpose(1, 2).contiguous()  # [E, in, out]
            name = proj
        dense.append((name, t))
    dense_dir = save(root / "dense", dense_cfg, dense)
    return {"hf": hf, "original": orig, "dense": dense_dir}


@pytest.fixture(scope="module")
def reference(sharp):
    from transformers import GptOssForCausalLM as HFModel
    from transformers import Mxfp4Config

    ref = HFModel.from_pretrained(sharp["hf"], quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    return ref.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 201088, (2, T), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["hf", "original", "dense"])
@pytest.mark.parametrize("experts", ["mxfp4", "dequantized"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers(sharp, reference, ids, layout, experts, attn):
    ours = model.from_pretrained(sharp[layout], dtype=torch.float32, experts=experts, attn_implementation=attn)
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids).logits
    assert got.shape == (2, T, 201088)
    assert _rel(got, want) < REL_TOL


def test_every_quirk_moves_the_logits(sharp, reference, ids):
    """Each gpt-oss quirk, switched off, changes the logits far more than the parity tolerance."""
    with torch.no_grad():
        want = reference(ids).logits
    base = model.from_pretrained(sharp["hf"], dtype=torch.float32, experts="dequantized", attn_implementation="eager")

    def perturbed(edit):
        m = model.from_pretrained(sharp["hf"], dtype=torch.float32, experts="dequantized", attn_implementation="eager")
        edit(m)
        with torch.no_grad():
            return _rel(m(ids).logits, want)

    no_sinks = lambda m: [layer.self_attn.sinks.data.fill_(-1e4) for layer in m.model.layers]  # noqa: E731
    no_window = lambda m: object.__setattr__(m, "config", m.config.replace(sliding_window=10_000))  # noqa: E731
    no_yarn = lambda m: setattr(m.model.rotary, "scale", 1.0)  # noqa: E731
    top1 = lambda m: [setattr(layer.mlp, "top_k", 1) for layer in m.model.layers]  # noqa: E731
    no_bias = lambda m: [layer.mlp.experts.gate_up_proj_bias.data.zero_() for layer in m.model.layers]  # noqa: E731
    for edit in (no_sinks, no_window, no_yarn, top1, no_bias):
        assert perturbed(edit) > 100 * REL_TOL
    with torch.no_grad():
        assert _rel(base(ids).logits, want) < REL_TOL


def test_loss_and_aux_loss_match_transformers(sharp, reference, ids):
    labels = ids.clone()
    labels[:, :7] = -100
    ours = model.from_pretrained(sharp["hf"], dtype=torch.float32, experts="mxfp4")
    with torch.no_grad():
        want = reference(ids, labels=labels, output_router_logits=True)
        got = ours(ids, labels=labels, return_aux_loss=True)
    assert got.logits is None
    assert got.n_tokens == 2 * (T - 7)
    # HF adds coef * aux to its loss when router logits are requested.
    hf_ce = want.loss - reference.config.router_aux_loss_coef * want.aux_loss
    assert abs(got.loss.item() - hf_ce.item()) < 1e-4 * hf_ce.item()
    assert abs(got.aux_loss.item() - want.aux_loss.item()) < 1e-5 * want.aux_loss.item()


def test_packed_batch_equals_separate_examples(sharp):
    """position_ids restarting at 0 isolate examples: logits equal running each example alone."""
    m = model.from_pretrained(sharp["hf"], dtype=torch.float32, experts="mxfp4")
    a = torch.randint(0, 201088, (1, 23), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 201088, (1, 30), generator=torch.Generator().manual_seed(2))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(23), torch.arange(30)]).unsqueeze(0)
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            m.attn_implementation = impl
            got = m(packed, position_ids=pos).logits
            assert _rel(got[:, :23], m(a).logits) < 1e-5
            assert _rel(got[:, 23:], m(b).logits) < 1e-5


def test_packed_loss_skips_the_boundary_target(sharp):
    m = model.from_pretrained(sharp["hf"], dtype=torch.float32, experts="mxfp4")
    ids = torch.randint(0, 201088, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(8), torch.arange(12)]).unsqueeze(0)
    with torch.no_grad():
        out = m(ids, labels=ids, position_ids=pos)
        logits = m(ids, position_ids=pos).logits[0]
    targets = [t for t in range(1, 20) if t != 8]  # token 8 starts the second example
    # the reference in float64: an fp32 log_softmax over 201088 logits is itself off by ~1e-6 relative
    want = torch.nn.functional.cross_entropy(logits[[t - 1 for t in targets]].double(), ids[0, targets])
    assert out.n_tokens == 18
    assert abs(out.loss.item() - want.item()) < 1e-5


def test_attention_masks_are_the_documented_ones():
    cfg = preset("tiny").replace(sliding_window=3)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    masks = attention_masks(pos, cfg)
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    for i in range(7):
        for j in range(7):
            same = (i < 5) == (j < 5)
            assert full[i, j] == (same and j <= i)
            assert sliding[i, j] == (same and j <= i and i - j < 3)


def test_from_pretrained_defaults_and_trainability(tiny_hf, tiny_original):
    m = model.from_pretrained(tiny_hf)
    assert isinstance(m, GptOssForCausalLM)
    assert m.lm_head.weight.dtype == torch.bfloat16
    params = dict(m.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in params
    buffers = dict(m.named_buffers())
    assert buffers["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    assert "model.layers.0.mlp.experts.gate_up_proj" not in params
    # HF names, exactly what the checkpoint holds
    from model.checkpoint import Checkpoint

    assert set(m.state_dict()) == set(Checkpoint(tiny_hf).names())
    d = model.from_pretrained(tiny_original, dtype=torch.float32, experts="dequantized")
    assert d.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 64, 128)
    assert d.model.layers[1].mlp.experts.down_proj.requires_grad
    with torch.no_grad():
        out = m(torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
