"""Training configs: strict keys and types, dotted overrides, impossible combinations; shipped configs validate."""

from pathlib import Path

import pytest
import yaml

from finetune import config as cfglib

ROOT = Path(__file__).resolve().parents[1]


def _base(tmp_path) -> dict:
    (tmp_path / "train.jsonl").write_text("{}\n")
    return {"model": {"path": str(tmp_path / "base"), "init_preset": "tiny"},
            "data": {"train": str(tmp_path / "train.jsonl")}, "output_dir": str(tmp_path / "run")}


def test_defaults_and_overrides(tmp_path):
    cfg = cfglib.from_dict(_base(tmp_path), ["train.lr=2e-4", "lora.targets=[attention, router]", "train.max_steps=7",
                                             "data.packing=false", "train.max_grad_norm=null"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.data.packing is False
    assert cfg.lora.targets == ("attention", "router") and cfg.train.max_grad_norm is None
    assert cfg.method == "lora" and cfg.model.experts == "mxfp4" and cfg.lora.r == 16
    again = cfglib.from_dict(yaml.safe_load(cfglib.dump(cfg)))  # the saved config.yaml reloads to the same
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown config key train.lrr \(did you mean train.lr\?\)"),
    ("lorra.r=4", r"unknown config key lorra \(did you mean lora\?\)"),
    ("train.batch_size=two", r"train.batch_size: expected an integer, got 'two'"),
    ("train.batch_size=true", r"train.batch_size: expected an integer"),
    ("lora.targets=[attn]", r"lora.targets\[0\]: 'attn' is not one of .*did you mean 'attention'"),
    ("method=fulll", r"method: 'fulll' is not one of"),
    ("method=full", r"model.experts: dequantized"),
    ("lora.targets=[]", r"nothing would be trained"),
    ("lora.dropout=0.1", r"lora.dropout must be 0 when lora.targets includes experts"),
    ("train.grad_accum=0", r"train.grad_accum must be at least 1"),
    ("data.eval=/nope/eval.jsonl", r"data.eval: no such file"),
    ("model.init_preset=null", r"model.path: no such directory"),
])
def test_bad_configs_are_named(tmp_path, override, message):
    with pytest.raises(cfglib.ConfigError, match=message):
        cfglib.from_dict(_base(tmp_path), [override])


def test_missing_required_key_and_file_errors(tmp_path):
    d = _base(tmp_path)
    del d["output_dir"]
    with pytest.raises(cfglib.ConfigError, match="missing required config key output_dir"):
        cfglib.from_dict(d)
    (tmp_path / "c.yaml").write_text("model: [1, 2\n")
    with pytest.raises(cfglib.ConfigError, match=r"c.yaml: invalid YAML"):
        cfglib.load(tmp_path / "c.yaml")
    with pytest.raises(cfglib.ConfigError, match="no such config file"):
        cfglib.load(tmp_path / "missing.yaml")


def test_hub_ids_are_not_checked_as_local_paths(tmp_path):
    d = _base(tmp_path)
    d["model"] = {"path": "openai/gpt-oss-20b"}
    d["data"]["train"] = "HuggingFaceH4/Multilingual-Thinking"
    cfg = cfglib.from_dict(d)
    assert cfg.model.path == "openai/gpt-oss-20b"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    # Recipes name hub datasets and models that are not on this machine (check_paths=False); the keys,
    # types and combinations, over their hardware file, are what is checked here.
    cfg = cfglib.load(path, check_paths=False)
    for key in ("train", "eval"):  # data shipped in the repository must be there
        value = getattr(cfg.data, key)
        if value and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
            assert Path(value).exists(), f"data.{key}: {value} is missing"


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_hardware_files_validate_under_a_recipe(path):
    for recipe in ("multilingual-thinking.yaml", "quickstart-dpo.yaml"):
        cfg = cfglib.load(ROOT / "recipes" / recipe, [f"hardware={path}"], check_paths=False)
        assert cfg.model.path  # every hardware file names the model
