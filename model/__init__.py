"""The gpt-oss model in plain PyTorch, and everything about its weights."""

from . import mxfp4
from .checkpoint import Checkpoint, CheckpointError, CheckpointWriter, save, write_random
from .config import PRESETS, ConfigError, GptOssConfig, preset

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointWriter", "ConfigError", "GptOssConfig", "PRESETS",
    "mxfp4", "preset", "save", "write_random",
]

from .lora import add_lora, load_lora_state_dict, lora_state_dict, merge_lora, peft_config
from .modeling import CausalLMOutput, GptOssForCausalLM, from_pretrained

__all__ += [
    "CausalLMOutput", "GptOssForCausalLM", "add_lora", "from_pretrained", "load_lora_state_dict",
    "lora_state_dict", "merge_lora", "peft_config",
]
