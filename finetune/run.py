"""A run directory, the one owner of what `gptoss-ft train` writes and every other command reads.

    runs/NAME/
      config.yaml          the resolved config, read back as a typed `Config` (`RunDir.config`): absolute
                           paths, and for a hub base its id with the commit trained on (model.revision)
      base.json            the base checkpoint's fingerprint (`fingerprint`), checked by export, chat and --resume
      metrics.jsonl        one object per logged step
      rollouts.jsonl       GRPO: a few sampled completions, their rewards and advantages per logged step
      reference_logps.safetensors   DPO: the reference model's log-probs of every pair, computed once
      checkpoints/step-N/  resumable training state (`finetune.state`)
      adapter/             LoRA runs: a PEFT adapter (adapter_config.json + adapter_model.safetensors)
      model/               full fine-tuning: an HF checkpoint
      export/FORMAT/       exports written after training (`export.formats`; gguf: export/gguf/model.gguf)
      summary.json, loss.png

A run knows its base: `RunDir.start` (the trainer's first step) records the base's fingerprint, and
`RunDir.base` (export, the GGUF writer, chat) finds the base again, at the recorded location or the
one given with --base, and refuses one whose fingerprint differs, naming both. The location may
change (a run moved or copied elsewhere exports with --base); the model may not.

Adapters are read and written here, in PEFT's layout (`model.lora` decides the names): the rank,
alpha, rsLoRA and targets of an adapter_config.json mean the same thing to the trainer, export,
GGUF, chat and evaluation because they all go through `read_adapter` / `attach_adapter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file

from model import lora as loralib
from model.checkpoint import Checkpoint, CheckpointError, atomic_directory, atomic_file, resolve
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
    base_file = property(lambda self: self.path / "base.json")
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
            return cfglib.from_dict(yaml.safe_load(self.config_file.read_text()) or {}, check_paths=False,
                                    relative_to=None)
        except cfglib.ConfigError as e:
            raise RunError(f"{self.config_file}: {e}") from None

    def write_config(self, cfg: Config) -> None:
        from . import config as cfglib

        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(cfglib.dump(cfg))

    def start(self, cfg: Config, *, resume: bool = False, write: bool = True) -> Config:
        """What the trainer does first: find the base (`cfg.model`), fingerprint it and, resuming,
        refuse a base other than the one the run began with; then (`write`) record config.yaml and
        base.json. Returns the config as recorded: for a hub base, `model.revision` is the commit."""
        where, hub_id, commit = locate_base(cfg.model.path, cfg.model.revision)
        found = fingerprint(where)
        if resume:
            recorded = self.recorded_fingerprint()
            if recorded is not None and recorded["fingerprint"] != found:
                raise RunError(f"--resume: {_named(cfg.model.path, commit)} at {where} is not the base {self.path} "
                               f"began with: fingerprint {found[:16]}, but the run recorded "
                               f"{recorded['fingerprint'][:16]} ({recorded['read_from']}); point model.path at that "
                               "checkpoint" + (" (model.revision pins a hub commit)" if hub_id else ""))
        if hub_id is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, revision=commit))
        if write:
            self.write_config(cfg)
            with atomic_file(self.base_file) as tmp:
                tmp.write_text(json.dumps({"fingerprint": found, "read_from": str(where)}, indent=2) + "\n")
        return cfg

    def recorded_fingerprint(self) -> dict | None:
        """base.json: {"fingerprint", "read_from"}; None for a run from before base fingerprints."""
        if not self.base_file.is_file():
            return None
        try:
            return json.loads(self.base_file.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.base_file}: not JSON ({e})") from None

    def base(self, override: str | None = None) -> Path:
        """The base checkpoint this run's weights go on, as a local directory: `override` (--base) or
        the recorded model.path (a hub id at its recorded commit). Its fingerprint must be the one
        the run recorded; a different checkpoint is refused with an error naming both."""
        model = self.config.model
        recorded = self.recorded_fingerprint()
        if override is not None:
            where = locate_base(override)[0]
        else:
            try:
                where = locate_base(model.path, model.revision)[0]
            except CheckpointError as e:
                fp = f" (fingerprint {recorded['fingerprint'][:16]})" if recorded else ""
                raise RunError(f"{self.path}: the base it was trained on, {_named(model.path, model.revision)}{fp}, "
                               f"cannot be read ({e}); if the run was moved or copied, pass --base PATH with "
                               "that checkpoint") from None
        if recorded is None:
            warnings.warn(f"{self.path} records no base fingerprint (a run from an older gptoss-ft): {where} is "
                          "used unchecked", stacklevel=2)
            return where
        found = fingerprint(where)
        if found != recorded["fingerprint"]:
            given = f"--base {override}" if override is not None else f"the recorded base {_named(model.path, model.revision)}"
            raise RunError(f"{self.path}: {given} ({where}, fingerprint {found[:16]}) is not the base this run "
                           f"was trained on ({recorded['read_from']}, fingerprint {recorded['fingerprint'][:16]}); "
                           "pass --base with that checkpoint")
        return where

    def trained_weights(self) -> Path:
        """adapter/ (LoRA) or model/ (full fine-tuning), which must exist: training finished."""
        full = self.config.tuning == "full"
        where = self.model if full else self.adapter
        probe = where / ("config.json" if full else ADAPTER_CONFIG)
        if not probe.is_file():
            raise RunError(f"{self.path}: no {where.name}/ (did training finish?)")
        return where


# -- the base checkpoint: where it is, and which model it is -------------------------------------------

SAMPLE_BYTES = 4096
"""Bytes of each tensor's data that go into a fingerprint (all of a tensor this small or smaller)."""


def locate_base(path: str, revision: str | None = None) -> tuple[Path, str | None, str | None]:
    """(local directory, hub id, commit) of a base model: an existing local directory as is (hub id
    and commit None), or a hub id downloaded at `revision` (default: the newest) into the HF cache."""
    local = Path(path).expanduser()
    if revision is None and local.exists():
        return Path(os.path.abspath(resolve(local))), None, None
    if revision is None:
        snapshot = resolve(path)  # a hub id: downloaded (or found in the cache when offline)
    else:
        try:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(path, revision=revision,
                                              allow_patterns=["*.json", "*.safetensors", "original/*"]))
        except Exception as e:  # network, auth, unknown revision: all end the same way for the user
            raise CheckpointError(f"could not get {path!r} at revision {revision!r} from the hub or its cache "
                                  f"({type(e).__name__}: {e})") from None
        snapshot = resolve(snapshot)
    # the HF cache keeps each commit in snapshots/<commit>/
    commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
    return snapshot, path, commit


def fingerprint(path) -> str:
    """sha256 (hex) of what makes a checkpoint that model, read cheaply: its model config, each
    tensor's name, dtype and shape (the safetensors headers) and `SAMPLE_BYTES` of its data (the
    start, two inner points and the end). The headers alone are the same for every checkpoint of one
    shape; the samples tell them apart. 20b: about 460 tensors, 1.9 MB read. Sharding and file
    names do not count; the layout read (HF, or OpenAI's original/) does."""
    ckpt = Checkpoint(path)
    h = hashlib.sha256(json.dumps(ckpt.config.to_hf_dict(), sort_keys=True).encode())
    tensors = []
    for f in sorted(ckpt.path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = (8 + n + o for o in info["data_offsets"])
                    tensors.append((name, info["dtype"], info["shape"], _samples(fh, begin, end)))
    for name, dtype, shape, data in sorted(tensors):
        h.update(json.dumps([name, dtype, shape]).encode())
        h.update(data)
    return h.hexdigest()


def _samples(fh, begin: int, end: int) -> bytes:
    size = end - begin
    if size <= SAMPLE_BYTES:
        fh.seek(begin)
        return fh.read(size)
    w = SAMPLE_BYTES // 4
    out = b""
    for k in range(4):
        fh.seek(begin + (size - w) * k // 3)
        out += fh.read(w)
    return out


def _named(path: str, revision: str | None) -> str:
    return f"{path}@{revision}" if revision else path


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
    """Read a finished run directory: its base (`base` overrides the recorded location, never the
    fingerprint check, `RunDir.base`) and its adapter/ or model/."""
    rd = RunDir(run_dir)
    cfg = rd.config
    weights = rd.trained_weights()
    base_path = rd.base(base)
    run = Run(rd.path, Checkpoint(base_path), data=cfg.data, objective=cfg.objective)
    if cfg.tuning == "full":
        run.tuned = Checkpoint(weights)
        if run.tuned.config.num_hidden_layers != run.base.config.num_hidden_layers:
            raise ExportError(f"{weights} and the base {base_path} have different shapes")
    else:
        run.adapter = read_adapter(weights)
        run.lora = run.adapter.pairs()
    return run
