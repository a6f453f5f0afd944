"""A run reads what its config names, wherever it is used from, and knows its base (issue 19).

Paths in a config file resolve against the file's directory, output_dir and key=value overrides
against the current directory, and the run records them absolute. The run records its base's
fingerprint; export (every format), chat and `train --resume` refuse a different checkpoint with an
error naming both, and `--base` moves the location, never the check. The decoy in these tests is
a checkpoint of the same shape (another seed) at the config's relative path seen from another
working directory: the silent wrong merge the issue found. Tiny models; a second or two per run.
"""

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml

from finetune import config as cfglib
from finetune.cli import main
from finetune.export import export
from finetune.generate import load_for_inference
from finetune.run import RunDir, RunError, fingerprint
from finetune.trainer import train
from model.checkpoint import Checkpoint, expected_shapes, write_random
from model.config import preset

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "recipes" / "data" / "quickstart_train.jsonl"
Q = "model.layers.1.self_attn.q_proj.weight"


def _project(root: Path) -> Path:
    """root/configs/c.yaml naming ../base and ../data/train.jsonl, as a user writes them."""
    write_random(root / "base", preset("tiny"), seed=0)
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text("\n".join(QUICK_TRAIN.read_text().splitlines()[:8]) + "\n")
    (root / "configs").mkdir()
    (root / "configs" / "c.yaml").write_text(yaml.safe_dump({
        "model": {"path": "../base"}, "data": {"train": "../data/train.jsonl", "format": "messages", "max_seq_len": 256},
        "lora": {"r": 2, "alpha": 4, "targets": ["attention", "experts"]},
        "train": {"max_steps": 1, "batch_size": 2, "save_every": 1, "lr": 1e-2}, "output_dir": "runs/r"}))
    return root


def _train_in(cwd: Path, config: Path, overrides=(), **kw) -> Path:
    before = os.getcwd()
    os.chdir(cwd)
    try:
        return train(config, list(overrides), **kw)
    finally:
        os.chdir(before)


def _tensors(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.get(n, own=True) for n in ck.names()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project trained from its own directory, its merged export made there (the reference), and
    a decoy: another working directory whose ../base is a different checkpoint of the same shape."""
    top = tmp_path_factory.mktemp("identity")
    proj = _project(top / "proj")
    run = _train_in(proj, proj / "configs" / "c.yaml")
    reference = _tensors(export(run, "merged", top / "reference").path)
    decoy = write_random(top / "other" / "base", preset("tiny"), seed=1)
    cwd = top / "other" / "cwd"
    cwd.mkdir()
    return proj, run, reference, decoy, cwd


def test_inputs_resolve_against_the_config_file_outputs_and_overrides_against_the_current_directory(tmp_path,
                                                                                                      monkeypatch):
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "data" / "train.jsonl").write_text("{}\n")
    (proj / "configs" / "c.yaml").write_text(yaml.safe_dump({
        "model": {"path": "../base", "init_preset": "tiny"}, "data": {"train": "../data/train.jsonl"},
        "evaluate": {"generate": "../data/train.jsonl"},
        "grpo": {"rewards": ["my_rewards.py:score", "exact_match", "pkg.rewards:score"]}, "output_dir": "runs/r"}))
    here = tmp_path / "here"
    here.mkdir()
    (here / "eval.jsonl").write_text("{}\n")
    monkeypatch.chdir(here)
    cfg = cfglib.load(proj / "configs" / "c.yaml", ["data.eval=eval.jsonl"])
    assert cfg.model.path == str(proj / "base")  # built there by init_preset, not in the current directory
    assert cfg.data.train == cfg.evaluate.generate == str(proj / "data" / "train.jsonl")
    assert cfg.data.eval == str(here / "eval.jsonl")  # typed on the command line: the current directory
    assert cfg.output_dir == str(here / "runs" / "r")  # written where the run is started
    assert cfg.grpo.rewards == (f"{proj / 'configs' / 'my_rewards.py'}:score", "exact_match", "pkg.rewards:score")
    # A config read back (a run's config.yaml) is already absolute and stays as it is.
    assert cfglib.from_dict(yaml.safe_load(cfglib.dump(cfg)), relative_to=None) == cfg

    d = yaml.safe_load((proj / "configs" / "c.yaml").read_text())
    d["model"] = {"path": "openai/gpt-oss-20b", "revision": "main"}  # a hub id stays a hub id
    (proj / "configs" / "hub.yaml").write_text(yaml.safe_dump(d))
    hub = cfglib.load(proj / "configs" / "hub.yaml")
    assert (hub.model.path, hub.model.revision) == ("openai/gpt-oss-20b", "main")
    # The old reading (relative to the current directory) is named, not followed.
    d["data"]["train"] = "eval.jsonl"
    (proj / "configs" / "old.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(cfglib.ConfigError, match=r"data.train: 'eval.jsonl' is not in the config file's directory "
                                                 r".*but is in the current directory"):
        cfglib.load(proj / "configs" / "old.yaml")
    with pytest.raises(cfglib.ConfigError, match="model.revision applies to hub ids"):
        cfglib.load(proj / "configs" / "c.yaml", [f"model.path={proj}", "model.revision=abc"])


@pytest.mark.parametrize("name", ["quickstart.yaml", "quickstart-dpo.yaml", "quickstart-grpo.yaml"])
def test_shipped_quickstart_configs_mean_the_same_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfglib.load(ROOT / "configs" / name, check_paths=False)  # grpo's adapter exists after the quickstart
    assert cfg.model.path == str(ROOT / "runs" / "tiny-base")
    for path in (cfg.data.train, cfg.data.eval, cfg.evaluate.generate):
        assert path is None or Path(path).is_file(), path
    assert cfg.output_dir == str(tmp_path / "runs" / Path(cfg.output_dir).name)
    if cfg.model.adapter:
        assert cfg.model.adapter == str(ROOT / "runs" / "quickstart" / "adapter")


def test_the_run_records_absolute_paths_and_its_base_fingerprint(trained):
    proj, run, *_ = trained
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert run == proj / "runs" / "r"
    assert recorded["model"]["path"] == str(proj / "base") and recorded["model"]["revision"] is None
    assert recorded["data"]["train"] == str(proj / "data" / "train.jsonl") and recorded["output_dir"] == str(run)
    base = json.loads((run / "base.json").read_text())
    assert base == {"fingerprint": fingerprint(proj / "base"), "read_from": str(proj / "base")}


def test_export_from_another_directory_merges_the_right_base_and_refuses_the_decoy(trained, tmp_path, monkeypatch,
                                                                                   capsys):
    proj, run, reference, decoy, cwd = trained
    assert not torch.equal(Checkpoint(decoy).get(Q), Checkpoint(proj / "base").get(Q))  # a real decoy
    monkeypatch.chdir(cwd)
    assert (cwd / Path(yaml.safe_load((proj / "configs" / "c.yaml").read_text())["model"]["path"])).resolve() == decoy
    merged = _tensors(export(run, "merged", tmp_path / "merged").path)
    assert merged.keys() == reference.keys()
    for name, t in reference.items():
        assert torch.equal(merged[name], t), name
    # GPTQ (the default) finds the run's calibration data from here too.
    assert main(["export", str(run), "--format", "mxfp4", "--out", str(tmp_path / "mxfp4")]) == 0
    assert "requantized (gptq" in capsys.readouterr().out

    fp_run, fp_decoy = fingerprint(proj / "base")[:16], fingerprint(decoy)[:16]
    fmts = ["adapter", "merged", "mxfp4"] + (["gguf"] if _has("gguf") else [])
    for fmt in fmts:
        out = tmp_path / ("x.gguf" if fmt == "gguf" else f"x-{fmt}")
        assert main(["export", str(run), "--format", fmt, "--out", str(out), "--base", str(decoy)]) == 2, fmt
        err = capsys.readouterr().err
        assert fp_run in err and fp_decoy in err and str(decoy) in err and str(proj / "base") in err, err
        assert not out.exists()


def test_chat_uses_the_recorded_base_and_refuses_the_decoy(trained, monkeypatch, capsys):
    proj, run, _, decoy, cwd = trained
    monkeypatch.chdir(cwd)
    ids = torch.randint(0, 200000, (1, 12), generator=torch.Generator().manual_seed(0))
    want = load_for_inference(str(proj / "base"), adapter=str(run / "adapter"), device="cpu")
    with torch.no_grad():
        assert torch.equal(load_for_inference(str(run), device="cpu")(ids).logits, want(ids).logits)
    with pytest.raises(RunError, match=f"{fingerprint(decoy)[:16]}.*{fingerprint(proj / 'base')[:16]}"):
        load_for_inference(str(run), base=str(decoy), device="cpu")
    assert main(["chat", str(run), "--base", str(decoy), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "is not the base this run was trained on" in capsys.readouterr().err


def test_resume_refuses_a_different_base_and_continues_on_its_own(trained, tmp_path):
    proj, run, _, decoy, _ = trained
    work = tmp_path / "proj"
    shutil.copytree(proj, work)
    config_before = (work / "runs" / "r" / "config.yaml").read_text()
    with pytest.raises(RunError, match=f"--resume: .*fingerprint {fingerprint(decoy)[:16]}.*recorded "
                                       f"{fingerprint(proj / 'base')[:16]}"):
        _train_in(work, work / "configs" / "c.yaml", [f"model.path={decoy}"], resume=True)
    assert (work / "runs" / "r" / "config.yaml").read_text() == config_before  # refused before writing anything
    # The copied project's own base (same files, another place) is the same model: resuming goes on.
    out = _train_in(work, work / "configs" / "c.yaml", ["train.max_steps=2"], resume=True)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert out == work / "runs" / "r" and steps == [1, 2]


def test_a_moved_run_exports_when_its_base_is_given(tmp_path, monkeypatch, capsys):
    proj = _project(tmp_path / "proj")
    run = _train_in(proj, proj / "configs" / "c.yaml")
    reference = _tensors(export(run, "merged", tmp_path / "reference").path)
    moved = tmp_path / "elsewhere"
    proj.rename(moved)  # the run and its base, somewhere else: the recorded paths are gone
    monkeypatch.chdir(tmp_path)
    run = moved / "runs" / "r"
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"the base it was trained on, {proj / 'base'} (fingerprint {fingerprint(moved / 'base')[:16]})" in err
    assert "pass --base PATH" in err
    # With its base given (and the calibration data, which moved too) every format exports.
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "m"), "--base",
                 str(moved / "base")]) == 0
    merged = _tensors(tmp_path / "m")
    assert all(torch.equal(merged[n], t) for n, t in reference.items())
    assert main(["export", str(run), "--format", "mxfp4", "--out", str(tmp_path / "q"), "--base", str(moved / "base"),
                 "--calib-data", str(moved / "data" / "train.jsonl")]) == 0


def _hub_snapshot(cache: Path, repo: str, commit: str, seed: int) -> None:
    """A model in the HF cache layout (what snapshot_download leaves), with refs/main at `commit`."""
    d = cache / f"models--{repo.replace('/', '--')}"
    write_random(d / "snapshots" / commit, preset("tiny"), seed=seed)
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / "main").write_text(commit)


def test_a_hub_base_is_recorded_with_its_commit_and_used_at_it(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest before huggingface_hub is imported)")
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    first, second = "a1" * 20, "b2" * 20
    _hub_snapshot(cache, "org/tiny", first, seed=0)
    cfg = cfglib.from_dict({"model": {"path": "org/tiny"}, "data": {"train": str(QUICK_TRAIN), "format": "messages",
                                                                    "max_seq_len": 256},
                            "lora": {"r": 2, "alpha": 4, "targets": ["attention"]},
                            "train": {"max_steps": 1, "batch_size": 2, "save_every": 1}, "output_dir": str(tmp_path / "run")})
    run = RunDir(train(cfg))
    assert (run.config.model.path, run.config.model.revision) == ("org/tiny", first)
    _hub_snapshot(cache, "org/tiny", second, seed=1)  # the hub's main moves on to another model
    merged = Checkpoint(export(run.path, "merged", tmp_path / "merged").path)
    at_first = Checkpoint(cache / "models--org--tiny" / "snapshots" / first)
    assert torch.equal(merged.get("model.embed_tokens.weight"), at_first.get("model.embed_tokens.weight"))
    with pytest.raises(RunError, match=f"--resume: org/tiny@{second} .*recorded {fingerprint(at_first.path)[:16]}"):
        train(cfg, resume=True)  # the user's config says org/tiny: main is now another model
    train(cfg, ["model.revision=" + first, "train.max_steps=2"], resume=True)  # pinned: the run goes on


def test_fingerprint_tells_checkpoints_of_one_shape_apart_and_ignores_where_they_are(tmp_path, tiny_hf):
    fp = fingerprint(tiny_hf)
    assert fingerprint(shutil.copytree(tiny_hf, tmp_path / "copy")) == fp
    resharded = write_random(tmp_path / "sharded", preset("tiny"), seed=0, max_shard_bytes=1 << 20)
    assert len(list(resharded.glob("*.safetensors"))) > 1 and fingerprint(resharded) == fp
    assert fingerprint(write_random(tmp_path / "seed1", preset("tiny"), seed=1)) != fp
    # One tuned tensor (a merged LoRA changes the whole weight), or one config field, is another model.
    ck = Checkpoint(tiny_hf)
    tensors = {n: ck.get(n, own=True) for n in ck.names()}
    tensors[Q] = tensors[Q] + 0.01
    from model.checkpoint import save

    assert fingerprint(save(tmp_path / "tuned", ck.config, tensors.items())) != fp
    wider = save(tmp_path / "theta", ck.config.replace(rope_theta=ck.config.rope_theta * 2), ck.items())
    assert fingerprint(wider) != fp


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_fingerprint_of_full_size_checkpoints_reads_headers_and_samples_only(name, tmp_path):
    """Sparse files with the real tensor list of 20b / 120b (13 / 61 GiB, no data written): the
    fingerprint must not read the weights."""
    c = preset(name)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    shards, header, offset = [], {}, 0
    for n, shape in expected_shapes(c).items():
        dtype, size = ("U8", 1) if n.endswith(("_blocks", "_scales")) else ("BF16", 2)
        nbytes = math.prod(shape) * size
        if header and offset + nbytes > 4 << 30:
            shards.append((header, offset))
            header, offset = {}, 0
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    shards.append((header, offset))
    weight_map = {}
    for i, (header, size) in enumerate(shards):
        f = tmp_path / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        raw = json.dumps(header).encode()
        with open(f, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + size)
        if f.stat().st_blocks * 512 > 1 << 24:
            pytest.skip("this filesystem does not keep sparse files")
        weight_map.update(dict.fromkeys(header, f.name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    t0 = time.perf_counter()
    fingerprint(tmp_path)
    assert time.perf_counter() - t0 < 2.0  # measured 0.02 s for either


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
