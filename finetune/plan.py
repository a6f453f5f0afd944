"""`gptoss-ft plan`: per-device peak memory of a fine-tuning run, before running it.

The figures count what our trainer actually holds (model/modeling.py, model/experts.py,
finetune/trainer.py), term by term. Parameters and buffers are counted on the module tree itself: the
model built on the meta device (no memory), with the adapters `add_lora` attaches for the LoRA
targets, its named parameters and buffers sorted by role (`_counts`):

- weights: attention, router, norms, embeddings and lm_head in the model dtype (bf16 on CUDA, fp32 on
  CPU: the trainer's `dtype: auto`); experts as MXFP4 uint8 blocks (half a byte a value) + one scale
  byte per 32 for LoRA with `experts: mxfp4`, dense in the model dtype for full fine-tuning.
  LoRA on one GPU keeps the frozen input embedding in CPU memory (`model.offload_embeddings`, on by
  default) and, with `model.offload_experts: N`, the MXFP4 experts of N layers (`--offload-experts`;
  `--fit GIB` finds the fewest layers that fit).
- trainable parameters, their gradients and AdamW's m and v: for LoRA the adapters of the configured
  targets only (`lora.targets`: attention, experts, router). LoRA adapters train in fp32 (the
  trainer upcasts them), so they are their own master copy; full fine-tuning trains the model-dtype
  weights directly and torch's AdamW keeps m and v in that dtype (no separate fp32 master copy).
  AdamW runs fused on CUDA and per tensor on CPU, so its step adds no state-sized temporary and the
  peak is the backward pass's.
- activations saved for backward, per decoder layer and token (elements, see `_layer_activations`),
  or with gradient checkpointing only each layer's input plus one layer being recomputed.
- the loss: logits only at labeled rows, one chunk of `logits_chunk_size` rows at a time, as an fp32
  buffer that becomes the gradient in place (+ the model-dtype logits and gradient copies in bf16).
- on-the-fly MXFP4 decoding: one expert's gate_up and down projections in the model dtype.
- framework: Python + torch + accelerate + datasets + the tokenizer (CPU, measured), or the CUDA
  context and cuBLAS workspaces (CUDA).

`--config FILE` plans a training config as the trainer will run it (its LoRA targets included). FSDP2
over N processes (`--gpus N`: GPUs, or CPU processes with `--device cpu`) divides parameters,
gradients and optimizer state by N and adds the unsharded units in flight: one decoder layer, and the
root unit (embeddings, final norm, lm_head) for the whole step. FSDP shards parameters only: frozen
MXFP4 experts are buffers, so every process holds all of them. With bf16, full fine-tuning under FSDP2
keeps fp32 master weights (accelerate upcasts what is trained), so its AdamW state is fp32 too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from torch import nn

from model.config import PRESETS, GptOssConfig
from model.lora import TARGETS, add_lora, is_lora_name
from model.modeling import Attention, GptOssForCausalLM

from . import config as cfglib

GIB = 2 ** 30
DEVICES = ("cpu", "cuda")
"""cuda: GPU memory per device; cpu: the peak RSS of a CPU run (fp32)."""


class PlanError(ValueError):
    """A plan that cannot be made from the arguments given; the message says which."""

# Measured on the 2-core dev box: RSS of `python -c "import torch, accelerate, datasets, rich.progress,
# model, data, finetune.trainer; Accelerator(cpu=True); data.get_tokenizer()"` = 419 MiB (torch 2.13,
# transformers not imported). What a CPU training process holds before it loads any weight.
CPU_FRAMEWORK_BYTES = 419 * 2 ** 20
# CUDA context (~0.5 GiB on Hopper with lazy module loading) + cuBLAS workspaces + caching-allocator
# slack; not measured here (no GPU on the dev box): the usual figure, stated as such.
CUDA_FRAMEWORK_BYTES = 1 * GIB
LOGITS_CHUNK = GptOssForCausalLM.logits_chunk_size
ATTENTION_QUERY_CHUNK = Attention.query_chunk


@dataclass
class Plan:
    model: str
    method: str
    device: str
    gpus: int
    seq_len: int
    batch_size: int
    gradient_checkpointing: bool
    lora_r: int
    offload_experts: int = 0
    offload_activations: bool = False
    moe_chunk_size: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    """bytes per device, per term"""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "device": self.device, "gpus": self.gpus,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "gradient_checkpointing": self.gradient_checkpointing, "lora_r": self.lora_r,
                "offload_experts": self.offload_experts, "offload_activations": self.offload_activations,
                "moe_chunk_size": self.moe_chunk_size,
                "peak_gib": round(self.peak_bytes / GIB, 3),
                "breakdown": {k: round(v / GIB, 3) for k, v in self.breakdown.items()}, "notes": self.notes}


def load_config(name_or_path: "str | GptOssConfig") -> GptOssConfig:
    if isinstance(name_or_path, GptOssConfig):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.exists() and name_or_path.removeprefix("openai/") in PRESETS:  # the hub ids
        return PRESETS[name_or_path.removeprefix("openai/")]
    if (path / "config.json").is_file():
        return GptOssConfig.from_json(path / "config.json")
    if (path / "original" / "config.json").is_file():
        return GptOssConfig.from_json(path / "original" / "config.json")
    raise FileNotFoundError(f"{name_or_path}: not a preset ({', '.join(PRESETS)}) nor a directory with config.json")


# How plan()'s note names each LoRA target.
_TARGET_NOTES = {"attention": "attention (q, k, v, o)", "experts": "every expert (gate_up, down)",
                 "router": "the router"}


def _role(name: str) -> str:
    """The role of a parameter of GptOssForCausalLM (or of one of its decoder layers), by its name:
    lora (adapters), embedding (the input table, which the trainer can offload), experts (dense
    expert weights), or dense (every other weight in the model dtype: attention, sinks, router,
    norms, expert biases, lm_head)."""
    if is_lora_name(name):
        return "lora"
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return "experts"
    return "dense"


def _tally(module: nn.Module) -> Counter:
    """Parameter values by `_role`, and bytes of buffers as "mxfp4": the model's only buffers are the
    frozen experts' MXFP4 blocks and scales (uint8). Tied weights count once (named_parameters
    yields a shared parameter once)."""
    n = Counter()
    for name, p in module.named_parameters():
        n[_role(name)] += p.numel()
    for b in module.buffers():
        n["mxfp4"] += b.numel() * b.element_size()
    return n


@functools.lru_cache(maxsize=None)
def _module_counts(config_json: str, experts: str, lora_r: int, lora_targets: tuple[str, ...]) -> Mapping[str, int]:
    # Keyed by the config's JSON: GptOssConfig holds dicts, so it is not hashable. fit() plans the
    # same model once per offloaded layer count; the meta model is built once.
    m = GptOssForCausalLM(GptOssConfig(**json.loads(config_json)), experts=experts, device="meta")
    if lora_targets:
        add_lora(m, r=lora_r, alpha=lora_r, targets=lora_targets)  # alpha scales updates, not shapes
    # Every decoder layer has the same shapes, so layer 0 stands for each of them.
    layer = {"layer_" + k: v for k, v in _tally(m.model.layers[0]).items()}
    return MappingProxyType({**_tally(m), **layer})


def _counts(c: GptOssConfig, experts: str, lora_r: int = 0, lora_targets: tuple[str, ...] = ()) -> Mapping[str, int]:
    """Counts by role (see `_tally`) of the model the trainer builds, with `experts` "mxfp4" or
    "dequantized" and LoRA of rank lora_r on lora_targets (none when empty): over the whole model,
    and with the prefix "layer_" over one decoder layer. Roles a model lacks are absent."""
    return _module_counts(json.dumps(dataclasses.asdict(c), sort_keys=True), experts, lora_r, lora_targets)


def _activations(c: GptOssConfig, device: str, s: int, *, attention_trained: bool, experts_trained: bool,
                 lora_r: int) -> dict[str, int]:
    """Bytes per token that one decoder layer's pieces hold in backward, counted from what autograd
    actually saves in our model (checked against saved-tensor hooks in tests/test_plan.py):

    - norms: the post-attention norm keeps its input (fp32 models); in bf16 each norm keeps the fp32
      copy of its input it normalises (`RMSNorm` upcasts), 4 bytes a value.
    - attention: CPU (flash kernel): its q, GQA-repeated k and v, output (4 nH d) and the fp32
      log-sum-exp; CUDA (flex): q, k, v without repeats, output (2 nH d + 2 nKV d) and three
      per-head fp32/bf16 values (lse, sigmoid, its copy). Trained projections keep their inputs
      (q/k/v share the normalised x; o_proj its own) and LoRA its [T, r] intermediates.
    - moe, per token (k routed slots): the sorted slot index (int64), the routing weight, the expert
      outputs concatenated and weighted (index_add keeps its source too), gate_up's output h (2I,
      the clamped SwiGLU recomputes the rest); trained experts keep their inputs (H, I) and LoRA's
      [n, r]s; the router's top-k indices (int64) and softmax (fp32).
    - moe_backward: its first backward buffers: the gradient gathered per slot, and those of the
      concatenated outputs and of the routing weights (3 k H), less the source index_add kept
      (released once its backward ran), with the layer's output gradient.
    - attention_backward: dq and the repeated dk, dv (CPU) or dq, dk, dv (CUDA), the output
      gradient and the residual stream's, less o_proj's input (released by then) when it is
      trained; on CPU one query chunk's mask (about 8 bytes per key) too. By then the layer's MoE
      and norms have released what they kept.
    """
    h, i = c.hidden_size, c.intermediate_size
    q, kv, nh, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads, \
        c.num_experts_per_tok
    norms = 4 * h if s == 4 else 2 * 4 * h
    if device == "cpu":
        attention = 4 * q * s + 2 * 4 * nh
        attention_backward = (4 * q + h) * s + 8 * ATTENTION_QUERY_CHUNK
    else:
        attention = (2 * q + 2 * kv) * s + 3 * 4 * nh
        attention_backward = (2 * q + 2 * kv + h) * s
    if attention_trained:
        attention += (h + q + 4 * lora_r) * s
        attention_backward -= q * s
    moe = k * (8 + s + 2 * h * s + 2 * i * s) + k * (8 + 4)
    if experts_trained:
        moe += k * (h + i + 2 * lora_r) * s
    return {"norms": norms, "attention": attention, "attention_backward": attention_backward, "moe": moe,
            "moe_backward": (2 * k * h + h) * s}


def _activation_terms(p: Plan, c: GptOssConfig, act: dict[str, int], s: int, tokens: int, labeled: int,
                      checkpointing: bool, offload: bool, chunk: int | None) -> None:
    """The activation terms of `p` at its peak: the larger of the loss (forward, one logits chunk
    live) and the backward of one decoder layer. Both hold the layers' saved state: every layer's
    activations, or with checkpointing each layer's input (in CPU memory with `offload`) plus the
    one layer recomputed. A chunked MoE holds its saved state and backward buffers for one chunk."""
    layers, h = c.num_hidden_layers, c.hidden_size
    moe_tokens = min(chunk, tokens) if chunk else tokens
    # One layer's saved state; the MoE's for one chunk (its checkpoint keeps the chunk's input: the norm's output).
    layer = (act["norms"] + act["attention"]) * tokens + act["moe"] * moe_tokens + (h * s * tokens if chunk else 0)
    rope = c.head_dim * s * tokens  # cos and sin, one pair for every layer
    # The two moments of a layer's backward: its MoE's (everything the layer saved, the MoE's first
    # buffers and the output gradient) and its attention's (the MoE and norms have released theirs).
    moments = {"MoE": (layer, act["moe_backward"] * tokens),
               "attention": (act["attention"] * tokens, act["attention_backward"] * tokens)}
    if chunk:
        # The layer output's gradient, and the gradients of the chunks' inputs, which the split's
        # backward collects until the last chunk is done and then concatenates.
        grads = 2 * h * s * tokens
        moments["MoE"] = (layer, (act["moe_backward"] - h * s) * moe_tokens + grads)
        moments["MoE chunks joined"] = (layer - act["moe"] * moe_tokens, grads + h * s * tokens)
    if not checkpointing:
        moments = {"MoE": moments["MoE"]}  # everything stays saved: the MoE moment is the larger
    which = max(moments, key=lambda m: sum(moments[m]))
    held, buffers = moments[which]
    if checkpointing:
        inputs = layers * h * s * tokens
        saved = {("activations: checkpointed layer inputs in CPU memory (on the GPU: one layer's)" if offload
                  else f"activations: checkpointed layer inputs ({layers} layers)"):
                 (h * s * tokens if offload else inputs + rope),
                 "activations: one layer recomputed in backward, still held" +
                 (f" (MoE in chunks of {chunk})" if chunk else ""): held}
        if offload:
            p.notes.append(f"checkpointed layer inputs in pinned CPU memory: {(inputs + layers * rope) / GIB:.2f} GiB "
                           "of host memory, copied back once per layer in backward (model.offload_activations)")
    else:
        # without checkpointing the input norm keeps each layer's input too (fp32; bf16 keeps its fp32 copy)
        saved = {"activations": layers * (layer + (h * s * tokens if s == 4 else 0)) + rope}
    backward = {"activation gradients and backward buffers (one layer)": buffers}
    # The loss: the final norm's input (fp32 copy in bf16) and output, the labeled rows gathered and
    # their gradient d logp / d h (formed in forward), and one logits chunk.
    chunk_rows = min(LOGITS_CHUNK, labeled)
    loss = {"loss: final hidden states, labeled rows and their gradient": (4 * h + h * s) * tokens + 2 * h * s * labeled,
            f"logits: {chunk_rows} rows x {c.vocab_size} (fp32 buffer{' + bf16 copies' if s == 2 else ''})":
                chunk_rows * c.vocab_size * (4 if s == 4 else 8)}
    if checkpointing:  # the layers' state at the loss: their inputs only (nothing is recomputed yet)
        at_loss = {k: v for k, v in saved.items() if "recomputed" not in k}
        if offload:  # every input is in CPU memory by then
            at_loss = {k: 0 for k in at_loss}
        at_backward = saved
    else:
        at_loss = at_backward = saved
    if sum(loss.values()) + sum(at_loss.values()) > sum(backward.values()) + sum(at_backward.values()):
        p.breakdown.update(at_loss)
        p.breakdown.update(loss)
        p.notes.append("peak at the loss (one logits chunk), before backward")
    else:
        p.breakdown.update(at_backward)
        p.breakdown.update(backward)
        p.notes.append(f"peak in the backward of one decoder layer (its {which})")


def plan(model: "str | GptOssConfig", *, method: str = "lora", seq_len: int = 2048, batch_size: int = 1, gpus: int = 1,
         device: str = "cuda", gradient_checkpointing: bool = False, lora_r: int = 16,
         lora_targets: tuple[str, ...] = ("attention", "experts"), labeled_tokens: int | None = None,
         offload_embeddings: bool = True, offload_experts: int = 0, dtype: str = "auto",
         offload_activations: bool = False, moe_chunk_size: int | None = None) -> Plan:
    """Peak memory per device. lora_targets: the config's `lora.targets` (attention, experts, router).
    labeled_tokens: trained tokens per micro-batch (default: all).
    offload_embeddings / offload_experts: the trainer's `model.offload_*` (LoRA on one GPU only).
    offload_activations / moe_chunk_size: `model.offload_activations` (with gradient checkpointing;
    nothing moves on CPU) and `model.moe_chunk_size` (long context).
    dtype: the config's `model.dtype` (auto: bfloat16 on cuda, float32 on cpu)."""
    if method not in cfglib.TRAINABLE:
        raise PlanError(f"method must be one of {', '.join(cfglib.TRAINABLE)}, got {method!r}")
    if method == "lora":
        if unknown := sorted(set(lora_targets) - set(TARGETS)):
            raise PlanError(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
        if not lora_targets:
            raise PlanError("LoRA needs at least one target")
        lora_targets = tuple(t for t in TARGETS if t in lora_targets)  # one order: one cache entry, one note
    if device not in DEVICES:
        raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype not in cfglib.DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(cfglib.DTYPES)}, got {dtype!r}")
    if min(seq_len, batch_size, gpus, lora_r) < 1:
        raise PlanError("seq-len, batch-size, gpus and r must be positive")
    if offload_activations and not gradient_checkpointing:
        raise PlanError("offload-activations keeps the inputs that gradient checkpointing saves: "
                        "it needs --gradient-checkpointing")
    if moe_chunk_size is not None and moe_chunk_size < 1:
        raise PlanError(f"moe-chunk-size must be a positive number of tokens, got {moe_chunk_size}")
    c = load_config(model)
    layers = c.num_hidden_layers
    if not 0 <= offload_experts <= layers:
        raise PlanError(f"offload-experts must be between 0 and {layers} (the model's layers), got {offload_experts}")
    # What the trainer offloads: frozen weights, one GPU (model.offload_* is ignored or refused otherwise).
    offloading = method == "lora" and device == "cuda" and gpus == 1
    if offload_experts and not offloading:
        raise PlanError("offload-experts applies to LoRA on one GPU (--method lora --device cuda --gpus 1)")
    embed_off = offload_embeddings and offloading and not c.tie_word_embeddings
    name = model if isinstance(model, str) else "model"
    p = Plan(name, method, device, gpus, seq_len, batch_size, gradient_checkpointing, lora_r, offload_experts,
             offload_activations, moe_chunk_size)
    # model dtype: the config's, or the trainer's auto (fp32 on CPU, bf16 on CUDA)
    s = 4 if dtype == "float32" or (dtype == "auto" and device == "cpu") else 2
    # The trainer's models: LoRA over frozen MXFP4 experts, full fine-tuning of dense ("dequantized") ones.
    n = _counts(c, "mxfp4", lora_r, lora_targets) if method == "lora" else _counts(c, "dequantized")
    tokens = seq_len * batch_size
    # FSDP2 over `gpus` processes (GPUs, or CPU processes with --device cpu) shards parameters,
    # gradients and optimizer state; buffers (the MXFP4 experts) it does not.
    shard = gpus
    # Trained weights under FSDP2 with bf16 are fp32 masters: accelerate upcasts trainable parameters
    # before fully_shard (FSDP2 needs one dtype per unit) and computes in bf16 copies it all-gathers.
    w = 4 if method == "full" and gpus > 1 else s
    h, i = c.hidden_size, c.intermediate_size
    input_embedding = n["embedding"]

    dense = n["dense"] + (0 if embed_off else input_embedding)
    p.breakdown["weights: attention, router, norms, lm_head" + ("" if embed_off else ", embeddings")
                + (" (model dtype)" if w == s else " (fp32 masters)")] = dense * (s if method == "lora" else w) // shard
    if embed_off:
        p.notes.append(f"input embedding kept in CPU memory ({input_embedding * s / GIB:.2f} GiB; model.offload_embeddings)")
    if method == "lora":
        # MXFP4: 16 bytes of blocks + 1 scale byte per 32 values; buffers, so never sharded
        on_gpu = layers - offload_experts
        p.breakdown[f"weights: experts MXFP4 blocks + scales (uint8), {on_gpu} of {layers} layers"] = \
            n["layer_mxfp4"] * on_gpu
        if offload_experts:
            off_gib = n["layer_mxfp4"] * offload_experts / GIB
            passes = 3 if gradient_checkpointing else 2  # forward (+ recompute) + backward
            p.notes.append(f"MXFP4 experts of {offload_experts} layers in pinned CPU memory ({off_gib:.2f} GiB), "
                           f"copied over per expert in each of {passes} passes: {off_gib * passes:.1f} GiB of PCIe "
                           "traffic per micro-batch (model.offload_experts)")
        trainable, pbytes, obytes = n["lora"], 4, 8
        p.breakdown["trainable: LoRA adapters (fp32)"] = trainable * pbytes // shard
        *rest, last = [_TARGET_NOTES[t] for t in lora_targets]
        p.notes.append(f"LoRA r={lora_r} on {', '.join(rest) + ' and ' if rest else ''}{last}: "
                       f"{trainable / 1e6:.1f}M trainable parameters")
    else:
        p.breakdown["weights: experts dense (" + ("model dtype" if w == s else "fp32 masters") + ", trained)"] = \
            n["experts"] * w // shard
        trainable, pbytes, obytes = n["embedding"] + n["dense"] + n["experts"], w, 2 * w
        p.notes.append(f"full fine-tuning: {trainable / 1e9:.2f}B trainable parameters, AdamW states in "
                       + ("the model dtype" if w == s else "fp32 (FSDP2 keeps fp32 masters under bf16)"))
    p.breakdown["gradients"] = trainable * pbytes // shard
    p.breakdown["optimizer: AdamW m and v"] = trainable * obytes // shard
    if gpus > 1:
        # One unit per decoder layer, all-gathered in the compute dtype for its forward and backward; the
        # root unit (embeddings, final norm, lm_head) stays gathered from the first forward to the end
        # of backward (accelerate does not reshard the root). Full fine-tuning adds the unsharded
        # gradients of a unit before they are reduce-scattered.
        layer = n["layer_dense"] + (n["layer_experts"] if method == "full" else 0)
        root = input_embedding + n["dense"] - layers * n["layer_dense"]
        p.breakdown["FSDP: one decoder layer unsharded (all-gather)"] = layer * s
        p.breakdown["FSDP: embeddings, final norm, lm_head unsharded (root unit)"] = root * s
        if method == "full":
            p.breakdown["FSDP: unsharded gradients of the root unit and one layer"] = (root + layer) * s

    act = _activations(c, device, s, attention_trained=method == "full" or "attention" in lora_targets,
                       experts_trained=method == "full" or "experts" in lora_targets,
                       lora_r=lora_r if method == "lora" else 0)
    _activation_terms(p, c, act, s, tokens, labeled_tokens if labeled_tokens is not None else tokens,
                      gradient_checkpointing, offload_activations and device == "cuda", moe_chunk_size)
    if method == "lora":
        p.breakdown["MXFP4 decode: one expert's gate_up + down"] = 3 * i * h * s
    p.breakdown["framework: " + ("python, torch, imports (measured)" if device == "cpu"
                                 else "CUDA context, workspaces")] = \
        CPU_FRAMEWORK_BYTES if device == "cpu" else CUDA_FRAMEWORK_BYTES
    if gpus > 1:
        p.notes.append(f"FSDP2 over {gpus} {'GPUs' if device == 'cuda' else 'CPU processes'}: figures per process")
    return p


def fit(budget_gib: float, model: "str | GptOssConfig", **kw) -> Plan | None:
    """The plan with the fewest offloaded expert layers whose peak is at most `budget_gib`, or None
    when even offloading every layer's experts does not fit."""
    for n in range(load_config(model).num_hidden_layers + 1):
        try:
            p = plan(model, offload_experts=n, **kw)
        except PlanError:  # n = 1 on a set-up where nothing is offloaded (n = 0 already ran with these args)
            return None
        if p.peak_bytes <= budget_gib * GIB:
            return p
    return None


def config_kwargs(config, overrides: list[str] = ()) -> dict:
    """plan()'s arguments for a training config (a path, with dotted `overrides` as `gptoss-ft train`
    takes them, or a loaded `finetune.config.Config`): the recipe's model, method, shapes, LoRA
    rank and targets, and offloading (offload_experts may be "auto"; see `auto_offload`)."""
    # a plan reads no data: the config's inputs need not exist here
    cfg = cfglib.load(config, list(overrides), check_paths=False) if isinstance(config, (str, Path)) else config
    # Sequences per micro-batch: DPO runs each pair's chosen and rejected rows together; GRPO trains
    # on num_generations completions of each prompt, each at most prompt + new tokens long.
    rows = {"dpo": 2, "grpo": cfg.grpo.num_generations}.get(cfg.objective, 1) * cfg.train.batch_size
    seq_len = cfg.grpo.max_prompt_len + cfg.grpo.max_new_tokens if cfg.objective == "grpo" else cfg.data.max_seq_len
    return dict(model=cfg.model.path, method=cfg.tuning, seq_len=seq_len, batch_size=rows,
                gradient_checkpointing=cfg.model.gradient_checkpointing, lora_r=cfg.lora.r, lora_targets=tuple(cfg.lora.targets),
                offload_embeddings=cfg.model.offload_embeddings, offload_experts=cfg.model.offload_experts,
                dtype=cfg.model.dtype, offload_activations=cfg.model.offload_activations,
                moe_chunk_size=cfg.model.moe_chunk_size)


def auto_offload(config, budget_gib: float, model: GptOssConfig | None = None) -> int:
    """`model.offload_experts: auto`: the fewest layers with which the run of `config` fits
    `budget_gib` on one GPU; every layer when even that does not fit (the closest the design gets).
    model: the loaded model's config, when `model.path` is not one the planner can read."""
    kw = config_kwargs(config)
    kw.pop("offload_experts")
    if model is not None:
        kw["model"] = model
    p = fit(budget_gib, **kw)
    return p.offload_experts if p is not None else load_config(kw["model"]).num_hidden_layers


def render_table(p: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    where = (f"{p.gpus} GPU{'s' if p.gpus > 1 else ''}" if p.device == "cuda"
             else "CPU (peak RSS)" if p.gpus == 1 else f"{p.gpus} CPU processes (peak RSS)")
    t = Table(title=f"{p.model} {p.method}, seq {p.seq_len} x batch {p.batch_size}, "
                    f"{'gradient checkpointing, ' if p.gradient_checkpointing else ''}{where}: per device")
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for k, v in p.breakdown.items():
        t.add_row(k, f"{v / GIB:.2f}")
    t.add_row("[bold]peak[/bold]", f"[bold]{p.peak_bytes / GIB:.2f}[/bold]")
    console = Console()
    console.print(t)
    for note in p.notes:
        console.print(f"- {note}")


def plan_run(*, config=None, overrides: list[str] = (), fit_gib: float | None = None, **given) -> Plan:
    """What `gptoss-ft plan` shows: the plan of a training config (with `overrides`) and/or of
    plan()'s keywords in `given` (None = not given; given ones win over the config's). With
    `fit_gib`, the fewest offloaded expert layers that fit a GPU of that size."""
    kw = config_kwargs(config, overrides) if config else {}
    kw.update({k: v for k, v in given.items() if v is not None})
    if "model" not in kw:
        raise PlanError("give --model or --config")
    auto = kw.get("offload_experts") == "auto"
    if fit_gib is None:
        if auto:
            kw["offload_experts"] = 0
        p = plan(**kw)
        if auto and p.device == "cuda":
            p.notes.append("the config says model.offload_experts: auto, which the trainer sizes to its GPU; "
                           "this plan offloads none (add --fit GIB for a GPU of GIB)")
        return p
    kw.pop("offload_experts", None)
    p = fit(fit_gib, **kw)
    if p is None:
        p = plan(**kw)
        p.notes.insert(0, f"does not fit in {fit_gib} GiB even with every layer's experts offloaded; "
                          "this is the plan without offloading")
    return p
