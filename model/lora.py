"""LoRA (arXiv:2106.09685) on gpt-oss in PEFT's layout for transformers' GptOss.

Our module names equal transformers' and we attach adapters where PEFT does, so with the prefix
`base_model.model.` our LoRA names are PEFT's saved adapter keys (checked against peft 0.21):

    attention  target_modules q_proj k_proj v_proj o_proj   ...self_attn.q_proj.lora_A.weight [r, in], lora_B [out, r]
    router     target_parameters mlp.router.weight          ...mlp.router.lora_A.weight [r, H], lora_B [E, r]
    experts    target_parameters mlp.experts.gate_up_proj   ...mlp.experts.base_layer.lora_A.weight [r*E, H], lora_B [2I, r*E]
               target_parameters mlp.experts.down_proj      ...mlp.experts.lora_A.weight [r*E, I], lora_B [H, r*E]

(the router is not an nn.Linear in transformers, so PEFT reaches it as a parameter; expert layout
in `experts.py`). Scaling is PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv:2312.03732,
`use_rslora`); B starts at zero so a fresh adapter leaves the logits unchanged. PEFT's parameter wrappers have no dropout, so dropout applies
to attention only and must be 0 when experts or the router are targeted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts, lora_scaling

PEFT_PREFIX = "base_model.model."
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # this order gives PEFT's nesting
ROUTER_PARAMETER = "mlp.router.weight"
TARGETS = ("attention", "experts", "router")
"""What `add_lora` can adapt (the config's `lora.targets`)."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapters a model carries (`GptOssForCausalLM.lora_settings`), as PEFT's config names them."""

    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "experts")
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` parameters, same names) plus `lora_A`/`lora_B`."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B A (the same parameter objects, updated in place)."""
        self.weight += (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(self.weight.dtype)
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight, base.bias = self.weight, self.bias
        return base


def _layers(model):
    return model.model.layers


def add_lora(model, *, r: int, alpha: float, dropout: float = 0.0,
             targets=("attention", "experts"), router: bool = False, use_rslora: bool = False) -> None:
    """Attach zero-initialised LoRA to `targets` ("attention", "experts", "router"; `router=True` adds
    the router too) and freeze everything else, as PEFT's `get_peft_model` does; unfreeze more
    afterwards if wanted. `model.lora_settings` records what was attached."""
    targets = set(targets) | ({"router"} if router else set())
    if unknown := targets - set(TARGETS):
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")
    if not targets:
        raise ValueError("add_lora needs at least one target")
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if dropout and targets & {"experts", "router"}:
        raise ValueError("lora dropout must be 0 when experts or the router are targeted "
                         "(PEFT's target_parameters wrappers support no dropout)")
    if model.lora_settings is not None:
        raise ValueError("the model already carries LoRA adapters")
    settings = LoraSettings(r=r, alpha=alpha, dropout=float(dropout), use_rslora=use_rslora,
                            targets=tuple(t for t in TARGETS if t in targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _layers(model):
        if "attention" in targets:
            for name in ATTENTION_MODULES:
                setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, settings.scaling, dropout))
        if "router" in targets:
            layer.mlp.router = LoRALinear(layer.mlp.router, r, settings.scaling, 0.0)
        if "experts" in targets:
            layer.mlp.experts.add_lora(r, alpha, use_rslora=use_rslora)
    model.lora_settings = settings


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...)."""
    return {PEFT_PREFIX + name: p.detach() for name, p in model.named_parameters() if is_lora_name(name)}


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def load_lora_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed adapter weights into a model that `add_lora` prepared with the same targets.
    Keys with PEFT's in-memory adapter name (`lora_A.default.weight`) are accepted too."""
    own = dict(model.named_parameters())
    want = {PEFT_PREFIX + n for n in own if is_lora_name(n)}
    given = {k.replace(".default.", "."): v for k, v in sd.items()}
    missing, unexpected = sorted(want - set(given)), sorted(set(given) - want)
    if missing or unexpected:
        raise KeyError(f"LoRA state dict does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, value in given.items():
            param = own[key[len(PEFT_PREFIX):]]
            if param.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)}, model has {tuple(param.shape)}")
            param.copy_(value)


def peft_config(model) -> dict:
    """The adapter_config.json body PEFT reads (base_model_name_or_path is left to the caller)."""
    s: LoraSettings | None = model.lora_settings
    if s is None:
        raise ValueError("the model has no LoRA adapters (call add_lora first)")
    target_parameters = []
    if "experts" in s.targets:
        target_parameters += list(EXPERT_PARAMETERS)
    if "router" in s.targets:
        target_parameters.append(ROUTER_PARAMETER)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": s.r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": list(ATTENTION_MODULES) if "attention" in s.targets else [],
        "target_parameters": target_parameters,
        "bias": "none",
        "use_rslora": s.use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def settings_from_peft(acfg: dict) -> LoraSettings:
    """The inverse of `peft_config`: what an adapter_config.json (ours or PEFT's for transformers'
    GptOss) attaches. Targets are read from target_modules / target_parameters."""
    params = acfg.get("target_parameters") or []
    targets = (("attention",) if acfg.get("target_modules") else ()) + \
        (("experts",) if any("experts" in p for p in params) else ()) + \
        (("router",) if any("router" in p for p in params) else ())
    return LoraSettings(r=int(acfg["r"]), alpha=float(acfg["lora_alpha"]), dropout=float(acfg.get("lora_dropout") or 0.0),
                        targets=targets, use_rslora=bool(acfg.get("use_rslora")))


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block the model computes as its base: every adapter's scale is 0 (B A x * 0 adds
    exact zeros), and comes back after. The reference model of DPO and GRPO without a second copy."""
    scaled = [m for m in model.modules() if isinstance(m, LoRALinear)]
    experts = [m for m in model.modules() if isinstance(m, Experts) and m.has_lora]
    saved = [m.scaling for m in scaled], [m.lora_scaling for m in experts]
    for m in scaled:
        m.scaling = 0.0
    for m in experts:
        m.lora_scaling = 0.0
    try:
        yield model
    finally:
        for m, v in zip(scaled, saved[0]):
            m.scaling = v
        for m, v in zip(experts, saved[1]):
            m.lora_scaling = v


def merge_lora(model) -> None:
    """Fold every adapter into its base weight and remove the adapters. MXFP4 experts become dense
    ("dequantized") experts: the merged weights are no longer MXFP4 values (requantize on export).
    Merged weights stay frozen, as they were under LoRA."""
    for layer in _layers(model):
        attn = layer.self_attn
        for name in ATTENTION_MODULES:
            if isinstance(getattr(attn, name), LoRALinear):
                setattr(attn, name, getattr(attn, name).merged())
        if isinstance(layer.mlp.router, LoRALinear):
            layer.mlp.router = layer.mlp.router.merged()
        experts: Experts = layer.mlp.experts
        experts.merge_lora()
    model.lora_settings = None
