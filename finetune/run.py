"""A run directory, the one owner of what `gptoss-ft train` writes and every other command reads.

    runs/NAME/
      config.yaml          the resolved config, read back as a typed `Config` (`RunDir.config`)
      metrics.jsonl        one object per logged step
      rollouts.jsonl       GRPO: a few sampled completions, their rewards and advantages per logged step
      reference_logps.safetensors   DPO: the reference model's log-probs of every pair, computed once
      checkpoints/step-N/  resumable training state (`finetune.state`)
      adapter/             LoRA runs: a PEFT adapter (adapter_config.json + adapter_model.safetensors)
      model/               full fine-tuning: an HF checkpoint
      export/FORMAT/       exports written after training (`export.formats`; gguf: export/gguf/model.gguf)
      summary.json, loss.png

Adapters are read and written here, in PEFT's layout (`model.lora` decides the names): the rank,
alpha, rsLoRA and targets of an adapter_config.json mean the same thing to the trainer, export,
GGUF, chat and evaluation because they all go through `read_adapter` / `attach_adapter`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file

from model import lora as loralib
from model.checkpoint import Checkpoint, atomic_directory
from model.config import GptOssConfig

if TYPE_CHECKING:
    from .config import Config, DataSection

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class RunError(ValueError):
    """A directory that is not (or not yet) the run a command needs; the message names it."""


class RunDir:
    """The paths of a run directory and its typed config."""

    def __init__(self, path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    rollouts = property(lambda self: self.path / "rollouts.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    model = property(lambda self: self.path / "model")
    summary = property(lambda self: self.path / "summary.json")
    loss_plot = property(lambda self: self.path / "loss.png")

    def export(self, fmt: str) -> Path:
        """Where `export.formats` writes `fmt` after training: a directory, or the GGUF file."""
        folder = self.path / "export" / fmt
        return folder / "model.gguf" if fmt == "gguf" else folder

    @classmethod
    def is_run(cls, path) -> bool:
        """A run directory has a config.yaml and is not itself a checkpoint (config.json)."""
        p = Path(path)
        return (p / "config.yaml").is_file() and not (p / "config.json").is_file()

    @property
    def config(self) -> Config:
        """The run's resolved config. Inputs are not checked for existence: a run moved to another
        machine still opens (its base is then given with --base)."""
        from . import config as cfglib  # not at the top: config takes export's formats, and export opens runs here

        if not self.config_file.is_file():
            raise RunError(f"{self.path}: not a run directory (no config.yaml)")
        try:
            return cfglib.from_dict(yaml.safe_load(self.config_file.read_text()) or {}, check_paths=False)
        except cfglib.ConfigError as e:
            raise RunError(f"{self.config_file}: {e}") from None

    def write_config(self, cfg: Config) -> None:
        from . import config as cfglib

        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(cfglib.dump(cfg))

    def trained_weights(self) -> Path:
        """adapter/ (LoRA) or model/ (full fine-tuning), which must exist: training finished."""
        full = self.config.tuning == "full"
        where = self.model if full else self.adapter
        probe = where / ("config.json" if full else ADAPTER_CONFIG)
        if not probe.is_file():
            raise RunError(f"{self.path}: no {where.name}/ (did training finish?)")
        return where


# -- adapters in PEFT's layout ------------------------------------------------------------------------

@dataclass
class Adapter:
    """An adapter directory's contents: what it attaches, and its weights under PEFT's saved keys."""

    settings: loralib.LoraSettings
    tensors: dict[str, torch.Tensor]
    config: dict
    """adapter_config.json as written."""

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (lora_A, lora_B) in fp32: `model.layers.0.self_attn.q_proj`, and for the
        experts `...mlp.experts.base_layer` (gate_up) and `...mlp.experts` (down)."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            name = key.removeprefix(loralib.PEFT_PREFIX).replace(".default.", ".")
            module, kind = name.rsplit(".lora_", 1)
            found.setdefault(module, {})[kind.split(".")[0]] = t.float()
        for module, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise RunError(f"adapter: {module} has lora_{''.join(ab)} only")
        return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


def read_adapter(adapter_dir) -> Adapter:
    """A PEFT adapter directory written by gptoss-ft (or by PEFT on transformers' GptOss)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file():
        raise RunError(f"{d}: not an adapter directory (no {ADAPTER_CONFIG})")
    acfg = json.loads((d / ADAPTER_CONFIG).read_text())
    return Adapter(loralib.settings_from_peft(acfg), load_file(str(d / ADAPTER_WEIGHTS)), acfg)


def attach_adapter(model, adapter_dir) -> loralib.LoraSettings:
    """Put the adapter in `adapter_dir` on `model` (a model without adapters): same targets, rank,
    scale (rsLoRA included) and weights as it was trained with."""
    adapter = read_adapter(adapter_dir)
    s = adapter.settings
    loralib.add_lora(model, r=s.r, alpha=s.alpha, targets=s.targets, use_rslora=s.use_rslora)
    loralib.load_lora_state_dict(model, adapter.tensors)
    return s


def save_adapter(model, out_dir, *, base_model: str, state_dict: dict | None = None) -> Path:
    """Write the model's LoRA weights as a PEFT adapter directory, atomically.

    `state_dict`: the model's full state dict when the live parameters are shards (FSDP, ZeRO-3);
    its LoRA entries are written instead of the parameters.
    """
    if state_dict is not None:
        weights = {loralib.PEFT_PREFIX + k: v for k, v in state_dict.items() if loralib.is_lora_name(k)}
    else:
        weights = loralib.lora_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    body = dict(loralib.peft_config(model))
    base = Path(base_model)
    body["base_model_name_or_path"] = str(base.resolve()) if base.exists() else base_model
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(body, indent=2) + "\n")
    return out


# -- a finished run as export reads it: base + adapter, or base + tuned model -------------------------

class ExportError(RunError):
    """A run or checkpoint that cannot be exported as asked; the message says why."""


@dataclass
class Run:
    """Where every tensor of a tuned model comes from, as export and the GGUF writer read it: a
    finished run (`open_run`), or a bare checkpoint (`Run.of_checkpoint`)."""

    path: Path
    base: Checkpoint
    """The model the run started from."""
    tuned: Checkpoint | None = None
    """Full fine-tuning: the run's `model/`."""
    adapter: Adapter | None = None
    """LoRA runs: the run's adapter/."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """LoRA runs: `Adapter.pairs()`."""
    data: DataSection | None = None
    """The run's data section (calibration tokens come from its training set); None for a checkpoint."""
    objective: str = "sft"
    """What the data rows are: "sft" examples, "dpo" preference pairs or "grpo" prompts."""

    @classmethod
    def of_checkpoint(cls, path) -> "Run":
        """A checkpoint as it is: nothing trained, nothing to merge."""
        return cls(Path(path), Checkpoint(path))

    @property
    def scaling(self) -> float:
        return self.adapter.settings.scaling if self.adapter is not None else 0.0

    @property
    def config(self) -> GptOssConfig:
        return self.base.config

    @property
    def source(self) -> Checkpoint:
        """Where every non-LoRA tensor of the tuned model comes from."""
        return self.tuned if self.tuned is not None else self.base


def open_run(run_dir, base: str | None = None) -> Run:
    """Read a finished run directory: its base (`base` overrides the recorded location) and its
    adapter/ or model/."""
    rd = RunDir(run_dir)
    cfg = rd.config
    base_path = base or cfg.model.path
    weights = rd.trained_weights()
    run = Run(rd.path, Checkpoint(base_path), data=cfg.data, objective=cfg.objective)
    if cfg.tuning == "full":
        run.tuned = Checkpoint(weights)
        if run.tuned.config.num_hidden_layers != run.base.config.num_hidden_layers:
            raise ExportError(f"{weights} and the base {base_path} have different shapes")
    else:
        run.adapter = read_adapter(weights)
        run.lora = run.adapter.pairs()
    return run
