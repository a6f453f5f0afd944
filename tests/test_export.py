"""`gptoss-ft export`: adapter, merged and MXFP4 exports of a run. Oracles: transformers + PEFT.

Runs are built directly (a random adapter, or a few optimizer steps in-process) instead of through
`gptoss-ft train`, which is tested elsewhere: what matters here is what export does with a run dir.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model as modellib
from finetune.cli import main
from finetune.export import export
from finetune import config as cfglib
from finetune.run import RunDir, save_adapter
from model import mxfp4
from model.checkpoint import Checkpoint
from model.gptq import choose_scales, gptq_quantize

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "recipes" / "data" / "quickstart_train.jsonl"
E = 8  # experts of the tiny preset


def lora_run(tmp_path: Path, base: Path, *, targets, seed=0, std=0.05, changed_experts=None, name="run") -> Path:
    """A LoRA run dir with a random adapter. changed_experts: {(layer, expert)} whose expert LoRA is
    non-zero (the rest zero, as for experts no token reached in training); None: all of them."""
    m = modellib.from_pretrained(base, dtype=torch.float32, experts="mxfp4")
    modellib.add_lora(m, r=4, alpha=8, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if changed_experts is not None:
            for li, layer in enumerate(m.model.layers):
                ex = layer.mlp.experts
                for holder in (ex.base_layer, ex):
                    b = holder.lora_B.weight.view(holder.lora_B.weight.shape[0], -1, E)  # [out, r, E]
                    for e in range(E):
                        if (li, e) not in changed_experts:
                            b[:, :, e] = 0
    run = tmp_path / name
    save_adapter(m, run / "adapter", base_model=str(base))
    _write_run_config(run, base, "lora", targets)
    return run


def _write_run_config(run: Path, base: Path, method: str, targets=("attention", "experts"), train=QUICK_TRAIN):
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"path": str(base), "experts": "mxfp4" if method == "lora" else "dequantized"},
           "data": {"train": str(train), "format": "messages", "max_seq_len": 256},
           "method": method, "lora": {"r": 4, "alpha": 8, "targets": list(targets)}, "output_dir": str(run)}
    RunDir(run).start(cfglib.from_dict(cfg))  # config.yaml and base.json, as the trainer records them


def tokens(n=2, t=48, seed=0):
    return torch.randint(0, 200000, (n, t), generator=torch.Generator().manual_seed(seed))


def tensors(path: Path, suffix: str) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names() if n.endswith(suffix)}


# -- merged ----------------------------------------------------------------------------------------

def test_merged_export_equals_base_plus_adapter_in_transformers(tmp_path, tiny_hf):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = lora_run(tmp_path, tiny_hf, targets=("attention", "experts", "router"), std=0.3)
    out = tmp_path / "merged"
    assert main(["export", str(run), "--format", "merged", "--out", str(out)]) == 0

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    ck = Checkpoint(out)
    ck.validate()
    assert ck.experts_format == "dequantized" and ck.get("model.layers.0.mlp.experts.down_proj").dtype == torch.bfloat16

    base = transformers.GptOssForCausalLM.from_pretrained(
        tiny_hf, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        base_out = base(input_ids=ids, labels=ids)
        tuned = peft.PeftModel.from_pretrained(base, run / "adapter")
        adapter_out = tuned(input_ids=ids, labels=ids)
        merged = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
        merged_out = merged(input_ids=ids, labels=ids)
    # bf16 rounding of the merged weights is the only difference; the adapter itself moves far more.
    # bf16 keeps 8 significant bits (relative rounding up to 2^-9 per weight); the tiny model's logits
    # spread like a trained model's (std ~4), so the loss moves by a few 1e-3 relative.
    assert float(merged_out.loss) == pytest.approx(float(adapter_out.loss), rel=4e-3)
    # Mean, not max: bf16 rounding of the merged router can flip a token's top-4 choice, which moves
    # that one token's logits a lot while the model as a whole is unchanged.
    off = (merged_out.logits - adapter_out.logits).abs().mean()
    assert off < 0.05 * (adapter_out.logits - base_out.logits).abs().mean(), off


def test_full_finetune_run_exports_its_model(tmp_path, tiny_hf):
    """A full run's model/ is the source: merged equals it (in bf16); in the MXFP4 export experts it
    did not change keep the base's bytes."""
    base = Checkpoint(tiny_hf)
    run = tmp_path / "full"
    _write_run_config(run, tiny_hf, "full")
    changed = {(1, 3)}
    with modellib.CheckpointWriter(run / "model", base.config.replace(quantization_config=None)) as w:
        for name in base.names():
            if name.endswith("_scales"):
                continue
            if name.endswith("_blocks"):
                layer, proj = int(name.split(".")[2]), name.split(".")[-1].removesuffix("_blocks")
                dense = base.get_expert_weight(layer, proj, torch.float32)
                if (layer, 3) in changed:
                    dense[3] += 0.01
                w.add(name.removesuffix("_blocks"), dense)
            else:
                t = base.get(name, torch.float32)
                w.add(name, t + 0.01 if name.endswith("q_proj.weight") else t)
    merged, mx = tmp_path / "merged", tmp_path / "mx"
    export(run, "merged", merged)
    export(run, "mxfp4", mx, requant="nearest")
    tuned = Checkpoint(run / "model")
    for name in tuned.names():
        assert torch.equal(Checkpoint(merged).get(name), tuned.get(name, torch.bfloat16)), name
    out = Checkpoint(mx)
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            for kind in ("_blocks", "_scales"):
                name = f"model.layers.{layer}.mlp.experts.{proj}{kind}"
                a, b = out.get(name), base.get(name)
                for e in range(E):
                    if (layer, e) not in changed:
                        assert torch.equal(a[e], b[e]), (name, e)
                    elif kind == "_blocks":
                        assert not torch.equal(a[e], b[e]), (name, e)


# -- mxfp4 -----------------------------------------------------------------------------------------

def test_mxfp4_export_loads_in_transformers_and_copies_untouched_experts(tmp_path, tiny_hf):
    transformers = pytest.importorskip("transformers")
    changed = {(0, 1), (0, 6), (1, 2)}
    run = lora_run(tmp_path, tiny_hf, targets=("attention", "experts"), changed_experts=changed)
    out = tmp_path / "mx"
    assert main(["export", str(run), "--format", "mxfp4", "--out", str(out), "--calib-tokens", "256"]) == 0

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    base, got = tensors(tiny_hf, ""), tensors(out, "")
    assert set(got) == set(base)
    for name, t in got.items():
        if name.endswith(("_blocks", "_scales")):
            assert t.dtype == torch.uint8
            for e in range(E):
                same = torch.equal(t[e], base[name][e])
                if (int(name.split(".")[2]), e) not in changed:
                    assert same, f"untouched expert {e} of {name} must be byte-identical"
                elif name.endswith("_blocks"):
                    assert not same, f"changed expert {e} of {name} kept the base's bytes"
        elif "self_attn" not in name:
            assert torch.equal(t, base[name]), name  # norms, router, embeddings, biases: as they were
        else:
            assert t.dtype == torch.bfloat16

    theirs = transformers.GptOssForCausalLM.from_pretrained(
        out, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    ours = modellib.from_pretrained(out, dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(input_ids=ids).logits, rtol=2e-4, atol=2e-4)


def test_attention_only_finetune_exports_experts_byte_identical(tmp_path, tiny_hf):
    run = lora_run(tmp_path, tiny_hf, targets=("attention",))
    hf, orig = tmp_path / "hf", tmp_path / "orig"
    report = export(run, "mxfp4", hf)
    assert report.experts_requantized == 0 and report.experts_copied == 2 * 2 * E
    export(run, "mxfp4", orig, layout="original")
    base = tensors(tiny_hf, "")
    for path in (hf, orig):
        ck = Checkpoint(path)
        assert ck.layout == ("original" if path == orig else "hf")
        for name in base:
            if ".mlp." in name:
                assert torch.equal(ck.get(name), base[name]), (path.name, name)
    with safe_open(str(orig / "model.safetensors"), "pt") as f:
        assert "block.0.mlp.mlp1_weight.blocks" in f.keys()
    q = Checkpoint(hf).get("model.layers.1.self_attn.q_proj.weight")
    assert not torch.equal(q, base["model.layers.1.self_attn.q_proj.weight"]), "attention LoRA was merged"


def test_gptq_rounding_beats_nearest_on_the_layer_output():
    """The point of error-aware rounding: a small change to an MXFP4 weight survives in X W^T."""
    gen = torch.Generator().manual_seed(0)
    w0 = mxfp4.dequantize(*mxfp4.quantize(torch.randn(64, 128, generator=gen) * 0.02), torch.float32)
    base_scales = mxfp4.quantize(w0)[1]
    delta = torch.randn(64, 8, generator=gen) @ torch.randn(8, 128, generator=gen) * 4e-4  # low rank, small
    w = w0 + delta
    # Inputs in a 16-dim subspace, as activations concentrate: the rounding error can hide outside it.
    x = torch.randn(512, 16, generator=gen) @ torch.randn(16, 128, generator=gen) * 0.3
    blocks, scales = gptq_quantize(w, x.t() @ x, keep_scales=base_scales)
    q = mxfp4.dequantize(blocks, scales, torch.float32)
    near = mxfp4.dequantize(*mxfp4.quantize(w), torch.float32)

    def kept(qw):  # share of the change's effect on the outputs that the quantized weight keeps
        return 1 - ((x @ (qw - w).t()).norm() / (x @ delta.t()).norm()).item()

    assert kept(q) > 0.4 and kept(near) < 0.2, (kept(q), kept(near))  # measured: 0.62 and 0.11
    assert torch.equal(scales, choose_scales(w, base_scales))
    covered = w.abs().reshape(64, 4, 32).amax(-1) <= 6 * torch.exp2(base_scales.float() - 127)
    assert torch.equal(scales[covered], base_scales[covered]), "scales that still cover the block are kept"
    assert torch.equal(mxfp4.quantize_with_scales(q, scales), blocks)


def _gptq_one_column_at_a_time(w, gram, scales, damp=0.01):
    """GPTQ as Algorithm 1 of arXiv:2210.17323 states it, written independently of model.gptq: one
    column at a time, every update applied at once (no lazy batches), fp64, the explicit inverse's
    Cholesky factor, rounding by search over the E2M1 grid; same act order and damping."""
    w, h = w.double().clone(), gram.double().clone()
    d = torch.diagonal(h)
    d[d == 0] = 1.0
    d += damp * d.mean()
    perm = torch.argsort(torch.diagonal(h), descending=True)
    h, w = h[perm][:, perm], w[:, perm]
    step = torch.exp2(scales.double() - mxfp4.SCALE_BIAS).repeat_interleave(mxfp4.BLOCK, 1)[:, perm]
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    grid = torch.tensor(mxfp4.FP4_VALUES, dtype=torch.float64)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        cand = grid[None] * step[:, i:i + 1]
        q[:, i] = cand.gather(1, (w[:, i:i + 1] - cand).abs().argmin(1, keepdim=True))[:, 0]
        w[:, i:] -= ((w[:, i] - q[:, i]) / u[i, i])[:, None] * u[i, i:][None]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out.float()


def test_blocked_batched_gptq_rounds_as_the_one_column_algorithm():
    """The lazy block updates (two levels) and the batch over experts are reorderings of the same
    arithmetic: every weight rounds as in the paper's one-column-at-a-time algorithm, and a batch
    gives each matrix what it gets alone."""
    gen = torch.Generator().manual_seed(1)
    n, out_dim, in_dim = 3, 64, 320  # in_dim: 5 blocks of 64, each 8 sub-blocks of 8
    w0 = mxfp4.dequantize(*mxfp4.quantize(torch.randn(n, out_dim, in_dim, generator=gen) * 0.02), torch.float32)
    keep = mxfp4.quantize(w0)[1]
    w = w0 + torch.randn(n, out_dim, 8, generator=gen) @ torch.randn(n, 8, in_dim, generator=gen) * 4e-4
    x = torch.randn(n, 200, 24, generator=gen) @ torch.randn(n, 24, in_dim, generator=gen)
    gram = x.transpose(1, 2).double() @ x.double()
    blocks, scales = gptq_quantize(w, gram, keep_scales=keep, block=64, sub_block=8)
    q = mxfp4.dequantize(blocks, scales, torch.float32)
    for k in range(n):
        alone = gptq_quantize(w[k], gram[k], keep_scales=keep[k], block=64, sub_block=8)
        assert torch.equal(alone[0], blocks[k]) and torch.equal(alone[1], scales[k])
        reference = _gptq_one_column_at_a_time(w[k], gram[k], scales[k])
        assert (reference == q[k]).float().mean() > 0.995  # measured: every weight the same
        out_err = lambda qw: ((x[k] @ (qw - w[k]).t()).norm() / (x[k] @ w[k].t()).norm()).item()
        nearest = mxfp4.dequantize(*mxfp4.quantize(w[k]), torch.float32)
        assert out_err(q[k]) <= 1.01 * out_err(reference) and out_err(q[k]) < 0.5 * out_err(nearest)


def test_gptq_inverse_factor_is_the_upper_cholesky_of_the_inverse():
    from model.gptq import _upper_cholesky_of_inverse

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 48, generator=gen, dtype=torch.float64)
    h = x.t() @ x + 0.1 * torch.eye(48, dtype=torch.float64)
    u = _upper_cholesky_of_inverse(h)
    assert torch.equal(u, u.triu()) and (torch.diagonal(u) > 0).all()
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(h))
    # the factor the GPTQ paper computes, Cholesky of the explicit inverse
    torch.testing.assert_close(u, torch.linalg.cholesky(torch.linalg.inv(h), upper=True))


# -- adapter and CLI ---------------------------------------------------------------------------------

def test_adapter_export_is_the_peft_directory_with_a_readme(tmp_path, tiny_hf):
    run = lora_run(tmp_path, tiny_hf, targets=("attention", "experts"))
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--format", "adapter", "--out", str(out), "--base", str(tiny_hf)]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "--enable-lora" in readme and "--max-lora-rank" in readme
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The 3-D expert layout vLLM reads: gate_up under experts.base_layer, down under experts.
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in keys


def test_export_errors_are_one_line(tmp_path, tiny_hf, capsys):
    run = tmp_path / "full"
    _write_run_config(run, tiny_hf, "full")
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "o")]) == 2
    assert "model/" in capsys.readouterr().err
    lora = lora_run(tmp_path, tiny_hf, targets=("attention",))
    assert main(["export", str(lora), "--format", "merged", "--layout", "original", "--out", str(tmp_path / "o")]) == 2
    assert "original layout" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--format", "adapter", "--out", str(tmp_path / "o")]) == 2
