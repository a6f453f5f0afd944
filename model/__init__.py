"""The gpt-oss model in plain PyTorch, and everything about its weights."""

from . import mxfp4
from .checkpoint import Checkpoint, CheckpointError, CheckpointWriter, save, write_random
from .config import PRESETS, ConfigError, GptOssConfig, preset

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointWriter", "ConfigError", "GptOssConfig", "PRESETS",
    "mxfp4", "preset", "save", "write_random",
]
