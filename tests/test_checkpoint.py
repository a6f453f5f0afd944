"""Checkpoint reading/writing: HF (single and sharded), original/, transformers as the loader oracle."""

import json
import pickle

import pytest
import torch

from model import mxfp4
from model.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, expected_shapes, save, write_random
from model.config import preset


def test_tiny_checkpoint_is_complete(tiny_hf):
    ck = Checkpoint(tiny_hf)
    ck.validate()
    assert ck.layout == "hf" and ck.experts_format == "mxfp4" and ck.config.is_mxfp4
    assert set(ck.names()) == set(expected_shapes(preset("tiny")))
    blocks = ck.get("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert blocks.dtype == torch.uint8  # bytes stay bytes until asked


def test_every_parameter_is_random(tiny_hf):
    ck = Checkpoint(tiny_hf)
    for name in ck.names():
        t = ck.get(name)
        if t.is_floating_point():
            assert t.float().std() > 0, f"{name} is constant"
    sinks = ck.get("model.layers.0.self_attn.sinks")
    norm = ck.get("model.layers.1.input_layernorm.weight")
    assert not torch.equal(sinks, torch.zeros_like(sinks)) and not torch.equal(norm, torch.ones_like(norm))


def test_original_layout_reads_back_as_its_hf_twin(tiny_hf, tiny_original):
    hf, orig = Checkpoint(tiny_hf), Checkpoint(tiny_original)
    assert orig.layout == "original"
    assert orig.config == hf.config.replace(quantization_config=None)
    assert sorted(orig.names()) == sorted(hf.names())
    for name in hf.names():
        assert torch.equal(hf.get(name), orig.get(name)), name
    from safetensors import safe_open

    with safe_open(str(tiny_original / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "block.0.attn.qkv.weight" in keys and "block.1.mlp.mlp1_weight.blocks" in keys
    assert "unembedding.weight" in keys and "embedding.weight" in keys and "norm.scale" in keys


def test_hf_directory_with_original_subdirectory(tiny_hf, tiny_original, tmp_path):
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(tiny_hf, root)
    shutil.copytree(tiny_original, root / "original")
    assert Checkpoint(root).layout == "hf"
    orig = Checkpoint(root, layout="original")
    assert orig.layout == "original" and orig.path == root / "original"
    assert torch.equal(orig.get("model.layers.1.self_attn.k_proj.weight"),
                       Checkpoint(root).get("model.layers.1.self_attn.k_proj.weight"))


def test_sharded_write_has_an_index_and_reads_back(tiny_hf, tmp_path):
    src = Checkpoint(tiny_hf)
    out = save(tmp_path / "sharded", src.config, src.items(), max_shard_bytes=8 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in src.items())
    back = Checkpoint(out)
    back.validate()
    for name in src.names():
        assert torch.equal(src.get(name), back.get(name)), name


def test_writer_streams_each_tensor_to_disk_in_safetensors_format(tmp_path):
    """Each tensor goes to disk when added (the writer keeps no reference: its memory is one tensor,
    not a shard), and safetensors itself reads back every dtype and shape, 0-d and empty included."""
    import gc
    import weakref

    from safetensors import safe_open

    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=gen), "bf16": torch.randn(7, generator=gen).bfloat16(),
               "f16": torch.randn(2, 2, generator=gen).half(), "u8": torch.randint(0, 255, (4, 3, 2), dtype=torch.uint8),
               "i64": torch.arange(5), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "big": torch.randn(64, 64, generator=gen)}
    with CheckpointWriter(tmp_path / "ck", cfg, max_shard_bytes=10_000) as w:
        for name, t in tensors.items():
            t = t.clone()
            ref = weakref.ref(t)
            w.add(name, t)
            del t
            gc.collect()
            assert ref() is None, f"the writer still holds {name}"
        out = w.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors) and len(set(index["weight_map"].values())) == 2
    assert not list(out.glob("*.data")), "no staging file is left"
    for name, t in tensors.items():
        with safe_open(str(out / index["weight_map"][name]), "pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_writer_without_kernel_copy_writes_the_same_files(tiny_hf, tmp_path, monkeypatch):
    """Where os.copy_file_range is missing (not Linux), shards are assembled by plain reads and writes."""
    import os

    src = Checkpoint(tiny_hf)
    fast = save(tmp_path / "fast", src.config, src.items(), max_shard_bytes=8 << 20)
    monkeypatch.delattr(os, "copy_file_range")
    slow = save(tmp_path / "slow", src.config, src.items(), max_shard_bytes=8 << 20)
    files = sorted(f.name for f in fast.iterdir())
    assert files == sorted(f.name for f in slow.iterdir()) and len(files) > 3
    assert all((fast / f).read_bytes() == (slow / f).read_bytes() for f in files)


def test_transformers_loads_our_mxfp4_checkpoint_with_identical_experts(tiny_hf):
    transformers = pytest.importorskip("transformers")
    model = transformers.GptOssForCausalLM.from_pretrained(
        tiny_hf, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    ck = Checkpoint(tiny_hf)
    for layer in range(ck.config.num_hidden_layers):
        experts = model.model.layers[layer].mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(experts, proj).data, ck.get_expert_weight(layer, proj, torch.float32))
            assert torch.equal(getattr(experts, proj + "_bias").data, ck.get(f"model.layers.{layer}.mlp.experts.{proj}_bias", torch.float32))
    theirs = dict(model.named_parameters())
    for name in ("model.layers.0.self_attn.sinks", "model.layers.1.self_attn.q_proj.bias", "lm_head.weight"):
        assert torch.equal(theirs[name].data, ck.get(name, torch.float32)), name


def test_dense_experts_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = write_random(tmp_path / "dense", preset("tiny"), seed=1, experts="dequantized")
    ck = Checkpoint(out)
    assert ck.experts_format == "dequantized" and not ck.config.is_mxfp4
    ck.validate()
    model = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = model.model.layers[1].mlp.experts.down_proj.data
    assert torch.equal(w, ck.get_expert_weight(1, "down_proj", torch.float32))


def test_expert_weight_is_the_transposed_dequantization(tiny_hf):
    ck = Checkpoint(tiny_hf)
    w = ck.get_expert_weight(1, "gate_up_proj", torch.float32)
    blocks = ck.get("model.layers.1.mlp.experts.gate_up_proj_blocks")
    scales = ck.get("model.layers.1.mlp.experts.gate_up_proj_scales")
    assert torch.equal(w, mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2))


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.target),))


def test_pickle_only_directory_is_refused_and_never_unpickled(tmp_path):
    _Exploit.target = str(tmp_path / "pwned")
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(ckpt / "pytorch_model.bin")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_misshapen_tensors_are_named(tiny_hf, tmp_path):
    src = Checkpoint(tiny_hf)
    dropped = "model.layers.1.self_attn.sinks"
    out = save(tmp_path / "missing", src.config, ((n, t) for n, t in src.items() if n != dropped))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.sinks"):
        Checkpoint(out).validate()
    with pytest.raises(CheckpointError, match="is missing"):
        Checkpoint(out).get(dropped)
    bad = "model.layers.0.mlp.router.bias"
    out = save(tmp_path / "shape", src.config,
               ((n, t[:-1] if n == bad else t) for n, t in src.items()))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.router.bias.*shape \[7\]"):
        Checkpoint(out).validate()


def test_write_is_atomic(tiny_hf, tmp_path):
    src = Checkpoint(tiny_hf)
    target = save(tmp_path / "ckpt", src.config, src.items())
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(target, src.config) as w:
            w.add("model.embed_tokens.weight", torch.zeros(3, 3))
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temp directory is left behind"
    Checkpoint(target).validate()


def test_original_layout_shards_and_reads_back(tiny_hf, tmp_path):
    src = Checkpoint(tiny_hf)
    out = save(tmp_path / "orig", src.config, src.items(), layout="original", max_shard_bytes=8 << 20)
    assert len(list(out.glob("*.safetensors"))) > 2
    back = Checkpoint(out)
    assert back.layout == "original"
    for name in src.names():
        assert torch.equal(src.get(name), back.get(name)), name


def test_full_size_presets_draw_expert_codes_like_a_quantized_gaussian(monkeypatch, tmp_path):
    """Above DRAW_CODES_ABOVE values (gpt-oss-20b's experts) codes are drawn, not searched: the
    dequantized weights have the std of the Gaussian they stand for, zero mean, and each code the
    frequency nearest rounding of that Gaussian gives at the drawn scale."""
    from model import checkpoint

    gen = torch.Generator().manual_seed(0)
    blocks, scales = checkpoint._drawn_mxfp4((2, 128, 90, 16), gen)
    assert blocks.dtype == scales.dtype == torch.uint8 and scales.shape == (2, 128, 90)
    w = mxfp4.dequantize(blocks, scales).float()
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0002
    step = 2.0 ** (scales[0, 0, 0].item() - mxfp4.SCALE_BIAS)
    gauss = torch.randn(2 * 128 * 2880, generator=gen) * 0.02
    want = torch.bucketize((gauss / step).abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))
    got = torch.bucketize((w.flatten() / step).abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))
    assert torch.allclose(torch.bincount(got, minlength=8) / got.numel(), torch.bincount(want, minlength=8) / want.numel(),
                          atol=0.003)
    # a checkpoint written that way is complete and loads (the tiny preset forced over the threshold)
    monkeypatch.setattr(checkpoint, "DRAW_CODES_ABOVE", 0)
    out = write_random(tmp_path / "drawn", preset("tiny"), seed=0)
    assert set(Checkpoint(out).names()) == set(expected_shapes(preset("tiny")))
