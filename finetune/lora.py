"""Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

`peft.PeftModel.from_pretrained(transformers_gpt_oss, adapter_dir)` loads what this writes; which
weights get adapters, and their names, are decided by `model.lora` (the same names PEFT gives them).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model, out_dir, *, base_model: str, state_dict: dict | None = None) -> Path:
    """Write the model's LoRA weights as a PEFT adapter directory, atomically.

    `state_dict`: the model's full state dict when the live parameters are shards (FSDP, ZeRO-3);
    its LoRA entries are written instead of the parameters.
    """
    from model import lora

    from model.checkpoint import atomic_directory

    if state_dict is not None:
        adapter = {lora.PEFT_PREFIX + k: v for k, v in state_dict.items() if lora.is_lora_name(k)}
    else:
        adapter = lora.lora_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    body = dict(lora.peft_config(model))
    base = Path(base_model)
    body["base_model_name_or_path"] = str(base.resolve()) if base.exists() else base_model
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(body, indent=2) + "\n")
    return out
