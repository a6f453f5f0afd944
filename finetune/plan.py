"""`gptoss-ft plan`: per-device peak memory of a fine-tuning run, before running it.

The figures count what our trainer actually holds (model/modeling.py, model/experts.py,
finetune/trainer.py), term by term:

- weights: attention, router, norms, embeddings and lm_head in the model dtype (bf16 on CUDA, fp32 on
  CPU: the trainer's `dtype: auto`); experts as MXFP4 uint8 blocks (half a byte a value) + one scale
  byte per 32 for LoRA with `experts: mxfp4`, dense in the model dtype for full fine-tuning.
  LoRA on one GPU keeps the frozen input embedding in CPU memory (`model.offload_embeddings`, on by
  default) and, with `model.offload_experts: N`, the MXFP4 experts of N layers (`--offload-experts`;
  `--fit GIB` finds the fewest layers that fit).
- trainable parameters, their gradients and AdamW's m and v. LoRA adapters train in fp32 (the
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

`--config FILE` plans a training config as the trainer will run it. FSDP over N GPUs (`--gpus`) divides parameters, gradients and optimizer state by N and adds one
layer's unsharded parameters (the all-gather in flight). FSDP shards parameters only: frozen MXFP4
experts are buffers, so every GPU holds all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from model.config import PRESETS, GptOssConfig
from model.modeling import GptOssForCausalLM

GIB = 2 ** 30


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
                "offload_experts": self.offload_experts,
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


def _counts(c: GptOssConfig, r: int) -> dict[str, int]:
    """Parameter (value) counts by role; LoRA counts for attention + experts at rank r."""
    h, d, nh, nkv, e, i = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads,
                           c.num_local_experts, c.intermediate_size)
    q, kv = nh * d, nkv * d
    attn = h * q + q + 2 * (h * kv + kv) + q * h + h + nh  # q, k, v, o with biases, sinks
    per_layer_dense = attn + 2 * h + e * h + e + e * 2 * i + e * h  # + norms, router, expert biases
    lora_attn = r * ((h + q) + 2 * (h + kv) + (q + h))
    lora_experts = r * e * (h + 2 * i) + r * e * (i + h)
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return {"dense": c.num_hidden_layers * per_layer_dense + embeddings + h,
            "embeddings": embeddings, "layer_dense": per_layer_dense,
            "experts": c.num_hidden_layers * e * 3 * i * h, "layer_experts": e * 3 * i * h,
            "lora": c.num_hidden_layers * (lora_attn + lora_experts)}


def _layer_activations(c: GptOssConfig, device: str) -> int:
    """Elements one decoder layer keeps for backward, per token (fused attention, our MoE):
    2 RMSNorms (input + normalised, 2H each); attention, on CPU (flash kernel): q before/after RoPE,
    k before RoPE, v, the kernel's contiguous q and GQA-repeated k, v, its output and o_proj's input
    (7 nH d + 2 nKV d); on CUDA (flex, GQA without repeats): q and k before/after RoPE, v, the
    output before and after the sink scaling and o_proj's input (5 nH d + 3 nKV d); per routed slot
    (k of them): the gathered input H, gate_up output 2I, activation I, expert output H."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = 7 * q + 2 * kv if device == "cpu" else 5 * q + 3 * kv
    k = c.num_experts_per_tok
    return 4 * c.hidden_size + attention + k * (2 * c.hidden_size + 3 * c.intermediate_size)


def plan(model: "str | GptOssConfig", *, method: str = "lora", seq_len: int = 2048, batch_size: int = 1, gpus: int = 1,
         device: str = "cuda", gradient_checkpointing: bool = False, lora_r: int = 16,
         labeled_tokens: int | None = None, offload_embeddings: bool = True, offload_experts: int = 0) -> Plan:
    """Peak memory per device. labeled_tokens: trained tokens per micro-batch (default: all).
    offload_embeddings / offload_experts: the trainer's `model.offload_*` (LoRA on one GPU only)."""
    if method not in ("lora", "full"):
        raise PlanError(f"method must be lora or full, got {method!r}")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"device must be cpu or cuda, got {device!r}")
    if min(seq_len, batch_size, gpus, lora_r) < 1:
        raise PlanError("seq-len, batch-size, gpus and r must be positive")
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
    p = Plan(name, method, device, gpus, seq_len, batch_size, gradient_checkpointing, lora_r, offload_experts)
    s = 4 if device == "cpu" else 2  # model dtype: fp32 on CPU, bf16 on CUDA (trainer's dtype: auto)
    n = _counts(c, lora_r)
    tokens = seq_len * batch_size
    shard = gpus if device == "cuda" else 1  # FSDP shards parameters, grads and optimizer state
    h, i = c.hidden_size, c.intermediate_size
    input_embedding = c.vocab_size * h

    dense = n["dense"] - (input_embedding if embed_off else 0)
    p.breakdown["weights: attention, router, norms, lm_head" + ("" if embed_off else ", embeddings")
                + " (model dtype)"] = dense * s // shard
    if embed_off:
        p.notes.append(f"input embedding kept in CPU memory ({input_embedding * s / GIB:.2f} GiB; model.offload_embeddings)")
    if method == "lora":
        # MXFP4: 16 bytes of blocks + 1 scale byte per 32 values; buffers, so never sharded
        on_gpu = layers - offload_experts
        p.breakdown[f"weights: experts MXFP4 blocks + scales (uint8), {on_gpu} of {layers} layers"] = \
            n["layer_experts"] * on_gpu * 17 // 32
        if offload_experts:
            off_gib = n["layer_experts"] * offload_experts * 17 / 32 / GIB
            passes = 3 if gradient_checkpointing else 2  # forward (+ recompute) + backward
            p.notes.append(f"MXFP4 experts of {offload_experts} layers in pinned CPU memory ({off_gib:.2f} GiB), "
                           f"copied over per expert in each of {passes} passes: {off_gib * passes:.1f} GiB of PCIe "
                           "traffic per micro-batch (model.offload_experts)")
        trainable, pbytes, obytes = n["lora"], 4, 8
        p.breakdown["trainable: LoRA adapters (fp32)"] = trainable * pbytes // shard
        p.notes.append(f"LoRA r={lora_r} on attention (q, k, v, o) and every expert (gate_up, down): "
                       f"{trainable / 1e6:.1f}M trainable parameters")
    else:
        p.breakdown["weights: experts dense (model dtype, trained)"] = n["experts"] * s // shard
        trainable, pbytes, obytes = n["dense"] + n["experts"], s, 2 * s
        p.notes.append(f"full fine-tuning: {trainable / 1e9:.2f}B trainable parameters, AdamW states in the model dtype")
    p.breakdown["gradients"] = trainable * pbytes // shard
    p.breakdown["optimizer: AdamW m and v"] = trainable * obytes // shard
    if device == "cuda" and gpus > 1:
        layer = n["layer_dense"] * s + (n["layer_experts"] * s if method == "full" else 0)
        p.breakdown["FSDP: one layer unsharded (all-gather)"] = layer

    per_layer = _layer_activations(c, device) * tokens * s
    if gradient_checkpointing:
        saved = layers * tokens * h * s + per_layer  # each layer's input, one layer recomputed
    else:
        saved = layers * per_layer
    p.breakdown["activations" + (" (gradient checkpointing)" if gradient_checkpointing else "")] = saved
    # Backward of one layer holds gradients about as large as that layer's saved activations.
    p.breakdown["activation gradients (one layer in backward)"] = per_layer

    chunk = min(LOGITS_CHUNK, labeled_tokens if labeled_tokens is not None else tokens)
    p.breakdown[f"logits: {chunk} rows x {c.vocab_size} (fp32 buffer{' + bf16 copies' if s == 2 else ''})"] = \
        chunk * c.vocab_size * (4 if s == 4 else 8)
    if method == "lora":
        p.breakdown["MXFP4 decode: one expert's gate_up + down"] = 3 * i * h * s
    p.breakdown["framework: " + ("python, torch, imports (measured)" if device == "cpu"
                                 else "CUDA context, workspaces")] = \
        CPU_FRAMEWORK_BYTES if device == "cpu" else CUDA_FRAMEWORK_BYTES
    if device == "cpu" and gpus > 1:
        p.notes.append("--device cpu: one process; --gpus is ignored")
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


def config_kwargs(config) -> dict:
    """plan()'s arguments for a training config (a path or a loaded `finetune.config.Config`): the
    recipe's model, method, shapes and offloading (offload_experts may be "auto"; see `auto_offload`)."""
    from . import config as cfglib

    cfg = cfglib.load(config) if isinstance(config, (str, Path)) else config
    return dict(model=cfg.model.path, method=cfg.method, seq_len=cfg.data.max_seq_len,
                batch_size=cfg.train.batch_size, gradient_checkpointing=cfg.model.gradient_checkpointing,
                lora_r=cfg.lora.r, offload_embeddings=cfg.model.offload_embeddings,
                offload_experts=cfg.model.offload_experts)


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

    where = f"{p.gpus} GPU{'s' if p.gpus > 1 else ''}" if p.device == "cuda" else "CPU (peak RSS)"
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


def command(args) -> int:
    kw = config_kwargs(args.config) if args.config else {}
    if args.model:
        kw["model"] = args.model
    if "model" not in kw:
        raise PlanError("give --model or --config")
    given = {"method": args.method, "seq_len": args.seq_len, "batch_size": args.batch_size,
             "gradient_checkpointing": args.gradient_checkpointing or None, "lora_r": args.lora_r,
             "offload_experts": args.offload_experts,
             "offload_embeddings": False if args.no_offload_embeddings else None}
    kw.update({k: v for k, v in given.items() if v is not None})  # flags override the config
    kw.update(gpus=args.gpus, device=args.device)
    auto = kw.get("offload_experts") == "auto"
    if auto and args.fit is None:
        kw["offload_experts"] = 0
    if args.fit is not None:
        kw.pop("offload_experts", None)
        p = fit(args.fit, **kw)
        if p is None:
            print(f"does not fit in {args.fit} GiB even with every layer's experts offloaded; the plan without "
                  "offloading follows")
            p = plan(**kw)
    else:
        p = plan(**kw)
    if auto and args.fit is None:
        p.notes.append("the config says model.offload_experts: auto, which the trainer sizes to its GPU; "
                       "this plan offloads none (add --fit GIB for a GPU of GIB)")
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        render_table(p)
    return 0
