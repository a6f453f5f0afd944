"""GptOssConfig: the model's hyper-parameters, named exactly as the HF `config.json` keys.

Built from an HF `config.json` (transformers 4.55 writes `rope_theta` + `rope_scaling`, 5.x writes
`rope_parameters`; both are read), from OpenAI's `original/config.json` (its own key names, mapped
below), or from a preset (`gpt-oss-20b`, `gpt-oss-120b`, `tiny`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

class ConfigError(ValueError):
    """A model configuration that cannot be used; the message names the key or the file."""


SLIDING = "sliding_attention"
FULL = "full_attention"

# What the released checkpoints keep in bf16; everything else under `mlp.experts` is MXFP4.
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}

# Keys HF writes that carry no model facts; accepted on read and not written back by us.
_HF_METADATA_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "auto_map", "experts_per_token", "initial_context_length", "output_attentions",
    "output_hidden_states", "return_dict", "bos_token_id", "hidden_act", "attention_dropout",
    "initializer_range", "output_router_logits", "use_cache", "router_aux_loss_coef",
}


def _default_rope_scaling() -> dict:
    # YaRN (arXiv:2309.00071) from a 4096 pre-training context to 131072.
    return {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int = 201088
    """Rows of `embed_tokens` and `lm_head` (o200k_harmony, padded)."""
    hidden_size: int = 2880
    """Residual width H."""
    intermediate_size: int = 2880
    """Expert width I; the fused gate/up projection is 2I wide (interleaved: even gate, odd up)."""
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    """GQA: each kv head serves num_attention_heads // num_key_value_heads query heads."""
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    """Router top-k; the softmax is taken over the k chosen logits only."""
    sliding_window: int = 128
    """A token on a sliding layer sees itself and the sliding_window - 1 tokens before it."""
    layer_types: tuple[str, ...] = ()
    """Per layer `sliding_attention` or `full_attention`; empty means alternate, sliding first."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: dict = field(default_factory=_default_rope_scaling)
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    """Clamp of the expert activation: gate to (-inf, limit], up to [-limit, limit]."""
    swiglu_alpha: float = 1.702
    """Sigmoid gain of the expert activation: gate * sigmoid(alpha * gate) * (up + 1)."""
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int = 200002
    """`<|return|>`; generation also stops on `<|call|>` (200012)."""
    pad_token_id: int = 199999
    """`<|endoftext|>`."""
    quantization_config: dict | None = None
    """Present (mxfp4) when the checkpoint stores experts as `*_blocks`/`*_scales`."""

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"layer_types has unknown kinds {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name}={getattr(self, name)} must be a multiple of 32 (MXFP4 blocks)")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            problems.append("num_experts_per_tok must be in 1..num_local_experts")
        if problems:
            raise ConfigError("invalid GptOssConfig: " + "; ".join(problems))

    # -- derived facts -------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def is_mxfp4(self) -> bool:
        return (self.quantization_config or {}).get("quant_method") == "mxfp4"

    def replace(self, **changes) -> "GptOssConfig":
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # -- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config", strict: bool = False) -> "GptOssConfig":
        """From an HF or an original-layout config dict.

        A key we do not know is a warning naming it (newer transformers releases add keys, and a real
        checkpoint must still load); with strict=True it is an error that suggests the closest key.
        """
        if "num_experts" in d and "num_local_experts" not in d and "experts_per_token" in d:
            return cls.from_original_dict(d, source=source, strict=strict)
        d = dict(d)
        if rp := d.pop("rope_parameters", None):  # transformers 5.x
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            d.setdefault("rope_scaling", rp)
        if d.get("num_experts") is not None:  # HF attribute_map alias
            d.setdefault("num_local_experts", d.pop("num_experts"))
        for key in ("eos_token_id", "pad_token_id"):
            if isinstance(d.get(key), list):  # HF allows a list; the first is the one we use
                d[key] = d[key][0]
            if key in d and d[key] is None:
                del d[key]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k in known:
                kwargs[k] = v
            elif k not in _HF_METADATA_KEYS:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                message = f"{source}: unknown gpt-oss config key {k!r}{hint}"
                if strict:
                    raise ConfigError(message)
                warnings.warn(message + "; ignored", stacklevel=2)
        if kwargs.get("layer_types") is None:
            kwargs.pop("layer_types", None)
        return cls(**kwargs)

    @classmethod
    def from_original_dict(cls, d: dict[str, Any], *, source: str = "config", strict: bool = False) -> "GptOssConfig":
        """OpenAI's original/config.json: its own names for the same facts (docs/ARCHITECTURE.md §4)."""
        d = dict(d)
        renames = {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
        rope = _default_rope_scaling()
        rope_keys = {
            "initial_context_length": "original_max_position_embeddings",
            "rope_scaling_factor": "factor",
            "rope_ntk_alpha": "beta_slow",  # OpenAI's alpha is HF's beta_slow
            "rope_ntk_beta": "beta_fast",
        }
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in renames:
                kwargs[renames[k]] = v
            elif k in rope_keys:
                rope[rope_keys[k]] = float(v) if k != "initial_context_length" else int(v)
            else:
                kwargs[k] = v
        kwargs["rope_scaling"] = rope
        kwargs.setdefault(
            "max_position_embeddings", int(rope["original_max_position_embeddings"] * rope["factor"])
        )
        return cls.from_dict(kwargs, source=source, strict=strict)

    @classmethod
    def from_json(cls, path: str | Path, *, strict: bool = False) -> "GptOssConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(d, source=str(path), strict=strict)

    def to_hf_dict(self, *, mxfp4: bool | None = None) -> dict[str, Any]:
        """The config.json transformers reads (`GptOssForCausalLM`)."""
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "quantization_config":
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        # transformers 5.x reads rope_parameters (with the theta inside); 4.x reads the pair.
        out["rope_parameters"] = {**self.rope_scaling, "rope_theta": self.rope_theta}
        out["hidden_act"] = "silu"
        out["experts_per_token"] = self.num_experts_per_tok
        out["initial_context_length"] = self.rope_scaling.get("original_max_position_embeddings", 4096)
        mx = self.is_mxfp4 if mxfp4 is None else mxfp4
        if mx:
            out["quantization_config"] = json.loads(json.dumps(MXFP4_QUANTIZATION_CONFIG))
        return out

    def to_original_dict(self) -> dict[str, Any]:
        """OpenAI's original/config.json."""
        r = self.rope_scaling
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": r.get("original_max_position_embeddings", 4096),
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": r.get("factor", 1.0),
            "rope_ntk_alpha": r.get("beta_slow", 1.0),
            "rope_ntk_beta": r.get("beta_fast", 32.0),
        }


PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(num_hidden_layers=24, num_local_experts=32,
                                quantization_config=MXFP4_QUANTIZATION_CONFIG),
    "gpt-oss-120b": GptOssConfig(num_hidden_layers=36, num_local_experts=128,
                                 quantization_config=MXFP4_QUANTIZATION_CONFIG),
    # Small enough for CPU tests and the quickstart; keeps the real vocab (the tokenizer is real),
    # top-k < experts (routing matters), and a short window so short sequences cross it.
    "tiny": GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=4,
        sliding_window=16, quantization_config=MXFP4_QUANTIZATION_CONFIG,
    ),
}


def preset(name: str) -> GptOssConfig:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}") from None
