"""`gptoss-ft plan`: per-device peak memory of a fine-tuning run, before running it.

The figures count what our trainer actually holds (model/modeling.py, model/experts.py,
finetune/trainer.py), term by term:

- weights: attention, router, norms, embeddings and lm_head in the model dtype (bf16 on CUDA, fp32 on
  CPU: the trainer's `dtype: auto`); experts as MXFP4 uint8 blocks (half a byte a value) + one scale
  byte per 32 for LoRA with `experts: mxfp4`, dense in the model dtype for full fine-tuning.
- trainable parameters, their gradients and AdamW's m and v. LoRA adapters train in fp32 (the
  trainer upcasts them), so they are their own master copy; full fine-tuning trains the model-dtype
  weights directly and torch's AdamW keeps m and v in that dtype (no separate fp32 master copy).
- activations saved for backward, per decoder layer and token (elements, see `_layer_activations`),
  or with gradient checkpointing only each layer's input plus one layer being recomputed.
- the loss: logits only at labeled rows, one chunk of `logits_chunk_size` rows at a time, as an fp32
  buffer that becomes the gradient in place (+ the model-dtype logits and gradient copies in bf16).
- on-the-fly MXFP4 decoding: one expert's gate_up and down projections in the model dtype.
- framework: Python + torch + accelerate + datasets + the tokenizer (CPU, measured), or the CUDA
  context and cuBLAS workspaces (CUDA).

FSDP over N GPUs (`--gpus`) divides parameters, gradients and optimizer state by N and adds one
layer's unsharded parameters (the all-gather in flight). FSDP shards parameters only: frozen MXFP4
experts are buffers, so every GPU holds all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from model.config import PRESETS, GptOssConfig

GIB = 2 ** 30

# Measured on the 2-core dev box: RSS of `python -c "import torch, accelerate, datasets, rich.progress,
# model, data, finetune.trainer; Accelerator(cpu=True); data.get_tokenizer()"` = 419 MiB (torch 2.13,
# transformers not imported). What a CPU training process holds before it loads any weight.
CPU_FRAMEWORK_BYTES = 419 * 2 ** 20
# CUDA context (~0.5 GiB on Hopper with lazy module loading) + cuBLAS workspaces + caching-allocator
# slack; not measured here (no GPU on the dev box): the usual figure, stated as such.
CUDA_FRAMEWORK_BYTES = 1 * GIB
LOGITS_CHUNK = 1024  # GptOssForCausalLM.logits_chunk_size


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
                "peak_gib": round(self.peak_bytes / GIB, 3),
                "breakdown": {k: round(v / GIB, 3) for k, v in self.breakdown.items()}, "notes": self.notes}


def load_config(name_or_path: str) -> GptOssConfig:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
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


def _layer_activations(c: GptOssConfig) -> int:
    """Elements one decoder layer keeps for backward, per token (fused attention, our MoE):
    2 RMSNorms (input + normalised, 2H each); q before/after RoPE, k before RoPE, v, and the flash
    kernel's contiguous q and GQA-repeated k, v plus its output and o_proj's input (7 nH d + 2 nKV d);
    per routed slot (k of them): the gathered input H, gate_up output 2I, activation I, expert output H."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    k = c.num_experts_per_tok
    return 4 * c.hidden_size + 7 * q + 2 * kv + k * (2 * c.hidden_size + 3 * c.intermediate_size)


def plan(model: str, *, method: str = "lora", seq_len: int = 2048, batch_size: int = 1, gpus: int = 1,
         device: str = "cuda", gradient_checkpointing: bool = False, lora_r: int = 16,
         labeled_tokens: int | None = None) -> Plan:
    """Peak memory per device. labeled_tokens: trained tokens per micro-batch (default: all)."""
    if method not in ("lora", "full"):
        raise ValueError(f"method must be lora or full, got {method!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if min(seq_len, batch_size, gpus, lora_r) < 1:
        raise ValueError("seq-len, batch-size, gpus and r must be positive")
    c = load_config(model)
    p = Plan(model, method, device, gpus, seq_len, batch_size, gradient_checkpointing, lora_r)
    s = 4 if device == "cpu" else 2  # model dtype: fp32 on CPU, bf16 on CUDA (trainer's dtype: auto)
    n = _counts(c, lora_r)
    tokens = seq_len * batch_size
    shard = gpus if device == "cuda" else 1  # FSDP shards parameters, grads and optimizer state
    h, i = c.hidden_size, c.intermediate_size

    p.breakdown["weights: attention, router, norms, embeddings (model dtype)"] = n["dense"] * s // shard
    if method == "lora":
        # MXFP4: 16 bytes of blocks + 1 scale byte per 32 values; buffers, so never sharded
        p.breakdown["weights: experts MXFP4 blocks + scales (uint8)"] = n["experts"] * 17 // 32
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

    per_layer = _layer_activations(c) * tokens * s
    if device == "cuda":
        # The fused sink attention is CPU-only today; CUDA runs the eager path, which keeps the fp32
        # probabilities and their model-dtype copy [B, nH, T, T] for backward.
        per_layer += batch_size * c.num_attention_heads * seq_len * seq_len * (4 + s)
        p.notes.append("CUDA attention is the eager path: keeps B x heads x T x T probabilities per layer")
    layers = c.num_hidden_layers
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
    p = plan(args.model, method=args.method, seq_len=args.seq_len, batch_size=args.batch_size, gpus=args.gpus,
             device=args.device, gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        render_table(p)
    return 0
