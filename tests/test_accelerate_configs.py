"""The shipped accelerate launch files parse with accelerate and name things that exist in our model.

Each is also run for real on CPU processes over gloo: DDP in test_train.py, FSDP2 and DeepSpeed
ZeRO-3 in test_fsdp.py (slow for ZeRO-3). Here: their settings against what the trainer relies on,
and the ZeRO-3 config as DeepSpeed's own config class reads it."""

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


def test_deepspeed_accepts_the_zero3_config_the_trainer_completes():
    """accelerate builds the DeepSpeed config from the launch file; the trainer fills in the micro-batch,
    accumulation and clipping from train.* (finetune/trainer.py, _deepspeed_setup); accelerate the
    total batch and bf16. DeepSpeed's DeepSpeedConfig is the judge (it checks batch arithmetic)."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = load("deepspeed_zero3.yaml").deepspeed_config
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds  # train.* owns them
    plugin = DeepSpeedPlugin(**{k: ds[k] for k in ("zero_stage", "zero3_init_flag", "zero3_save_16bit_model",
                                                   "offload_optimizer_device", "offload_param_device")})
    cfg = dict(plugin.deepspeed_config, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4,
               gradient_clipping=1.0, train_batch_size=2 * 4, bf16={"enabled": True})
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == 3 and parsed.gradient_accumulation_steps == 4
    assert parsed.zero_config.gather_16bit_weights_on_model_save  # the whole adapter/model at the end
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(dict(cfg, train_batch_size=7))


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml", "deepspeed_zero3.yaml"])
def test_each_file_says_how_to_launch(name):
    assert "accelerate launch --config_file configs/accelerate/" + name in (CONFIGS / name).read_text()
