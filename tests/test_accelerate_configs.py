"""The shipped accelerate launch files parse with accelerate and name things that exist in our model.

DDP is run for real (2 CPU processes over gloo) in test_train.py; FSDP2 and DeepSpeed need GPUs, so
here their settings are checked against what the trainer relies on."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

import model.modeling as modeling

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def load(name: str) -> ClusterConfig:
    return ClusterConfig.from_yaml_file(str(CONFIGS / name))


def test_ddp():
    cfg = load("ddp.yaml")
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.num_processes >= 2


def test_fsdp2_wraps_decoder_layers_and_saves_a_full_state_dict():
    cfg = load("fsdp2.yaml")
    fsdp = cfg.fsdp_config
    assert cfg.distributed_type.value == "FSDP" and int(fsdp["fsdp_version"]) == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    layer_cls = getattr(modeling, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    assert layer_cls is modeling.DecoderLayer
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # Our loader is not transformers': accelerate's RAM-efficient loading would skip it.
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def test_fsdp_plugin_accepts_the_settings():
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = load("fsdp2.yaml").fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=int(fsdp["fsdp_version"]), auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[fsdp["fsdp_transformer_layer_cls_to_wrap"]],
        state_dict_type=fsdp["fsdp_state_dict_type"], reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
    )
    assert plugin.fsdp_version == 2


def test_deepspeed_zero3_and_the_moe_leaf_exists():
    cfg = load("deepspeed_zero3.yaml")
    assert cfg.distributed_type.value == "DEEPSPEED"
    assert int(cfg.deepspeed_config["zero_stage"]) == 3
    assert cfg.deepspeed_config["zero3_save_16bit_model"] is True  # the full adapter/model at the end
    assert issubclass(modeling.MLPBlock, modeling.nn.Module)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml", "deepspeed_zero3.yaml"])
def test_each_file_says_how_to_launch(name):
    assert "accelerate launch --config_file configs/accelerate/" + name in (CONFIGS / name).read_text()
