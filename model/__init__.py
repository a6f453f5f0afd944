"""The gpt-oss model in plain PyTorch, and everything about its weights."""

from . import mxfp4
from .checkpoint import Checkpoint, CheckpointError, CheckpointWriter, save, write_random
from .config import PRESETS, ConfigError, GptOssConfig, preset
from .experts import set_qat
from .lora import adapters_disabled, add_lora, load_lora_state_dict, lora_state_dict, merge_lora, peft_config
from .modeling import CausalLMOutput, GptOssForCausalLM, KVCache, from_pretrained

__all__ = [
    "CausalLMOutput", "Checkpoint", "CheckpointError", "CheckpointWriter", "ConfigError", "GptOssConfig",
    "GptOssForCausalLM", "KVCache", "PRESETS", "adapters_disabled", "add_lora", "from_pretrained", "load_lora_state_dict", "lora_state_dict",
    "merge_lora", "mxfp4", "peft_config", "preset", "save", "set_qat", "write_random",
]
