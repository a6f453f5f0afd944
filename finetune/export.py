"""`gptoss-ft export`: a run's PEFT adapter, a merged bf16 checkpoint, or a merged checkpoint with
its experts requantized to MXFP4.

Streaming: every output tensor is computed from the base `Checkpoint` (memory-mapped, read tensor
by tensor) plus the adapter, one layer at a time, and handed to a `CheckpointWriter`. Peak memory is
about one layer's tensors plus the writer's pending shard, never the whole model in bf16. A full
fine-tuning run's `model/` is the source instead of base + adapter; the base is still read so that
unchanged experts can be recognised.

Requantization (DESIGN §6). Re-rounding `W + delta` to nearest erases every change smaller than half
a quantization step, which is most of a fine-tune. So:
- an expert projection training did not change is copied from the base byte for byte;
- a changed one keeps the base's scale for each block whose values it still covers (a fresh scale
  otherwise), and is rounded GPTQ-style (Frantar et al., arXiv:2210.17323): columns (input dims)
  are rounded one at a time and each rounding error is pushed onto the columns not yet rounded
  through the inverse of `H = X^T X`, so the layer's output on real inputs stays close to the
  tuned one even where single weights cannot move. X are the expert's inputs on calibration tokens
  from the run's training data, gathered by running the tuned model layer by layer (each token's
  row weighted by its routing weight, as the expert's error reaches the output scaled by it).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from model import mxfp4
from model.checkpoint import (DEFAULT_SHARD_BYTES, Checkpoint, CheckpointWriter, atomic_directory,
                              expected_shapes)
from model.config import MXFP4_QUANTIZATION_CONFIG, GptOssConfig
from model.experts import EXPERT_PROJS, lora_per_expert, swiglu_reference
from model.lora import PEFT_PREFIX
from model.modeling import DecoderLayer, RotaryEmbedding, attention_masks

FORMATS = ("adapter", "merged", "mxfp4")
REQUANT = ("gptq", "nearest")
# Files of an HF release that are not weights; copied so the export runs as the base does.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why."""


@dataclass
class Run:
    """What a run directory holds, as export needs it."""

    path: Path
    method: str
    """"lora" or "full"."""
    base: Checkpoint
    """The model the run started from."""
    tuned: Checkpoint | None
    """Full fine-tuning: the run's `model/`."""
    adapter_dir: Path | None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Module name (`model.layers.0.self_attn.q_proj`, `...mlp.experts.base_layer` = gate_up,
    `...mlp.experts` = down) -> (lora_A, lora_B) in fp32."""
    scaling: float = 0.0
    data: dict = field(default_factory=dict)
    """The run's resolved `data` section (calibration tokens come from its training set)."""

    @property
    def config(self) -> GptOssConfig:
        return self.base.config

    @property
    def source(self) -> Checkpoint:
        """Where every non-LoRA tensor of the tuned model comes from."""
        return self.tuned if self.tuned is not None else self.base


def open_run(run_dir, base: str | None = None) -> Run:
    """Read a run directory written by `gptoss-ft train` (config.yaml and adapter/ or model/)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    method = cfg.get("method", "lora")
    base_path = base or (cfg.get("model") or {}).get("path")
    if not base_path:
        raise ExportError(f"{cfg_path}: no model.path; pass --base")
    run = Run(path=run_dir, method=method, base=Checkpoint(base_path), tuned=None, adapter_dir=None,
              data=cfg.get("data") or {})
    if method == "full":
        if not (run_dir / "model").is_dir():
            raise ExportError(f"{run_dir}: a full fine-tuning run without model/ (did training finish?)")
        run.tuned = Checkpoint(run_dir / "model")
        if run.tuned.config.num_hidden_layers != run.base.config.num_hidden_layers:
            raise ExportError(f"{run_dir / 'model'} and the base {base_path} have different shapes")
        return run
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir}: no adapter/ (did training finish?)")
    run.adapter_dir = adapter
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = acfg["r"], acfg["lora_alpha"]
    run.scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r  # PEFT's two scalings
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, kind = name.rsplit(".lora_", 1)
        pairs.setdefault(module, {})[kind.split(".")[0]] = t.float()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter}: {module} has lora_{''.join(ab)} only")
        run.lora[module] = (ab["A"], ab["B"])
    return run


# -- the three formats ---------------------------------------------------------------------------

@dataclass
class ExportReport:
    path: Path
    format: str
    experts_copied: int = 0
    """Expert projections (one expert's gate_up or down) copied byte for byte from the base."""
    experts_requantized: int = 0
    calibration_tokens: int = 0


def export(run_dir, fmt: str, out, *, base: str | None = None, layout: str = "hf", requant: str = "gptq",
           calib_tokens: int = 2048, calib_data: str | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportReport:
    """Write `fmt` ("adapter", "merged" or "mxfp4") for the run in `run_dir` to `out`.

    base: the base checkpoint when not the run's `model.path`. layout: "hf" or "original" (OpenAI's,
    MXFP4 experts only). requant: "gptq" (error-aware, the default) or "nearest" (plain round to
    nearest, for comparison). calib_tokens / calib_data: how many training tokens, from which file
    (default: the run's `data.train`), GPTQ sees.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if requant not in REQUANT:
        raise ExportError(f"unknown requantization {requant!r}; choose from {', '.join(REQUANT)}")
    if layout not in ("hf", "original"):
        raise ExportError(f"layout must be hf or original, got {layout!r}")
    run = open_run(run_dir, base)
    out = Path(out)
    if fmt == "adapter":
        if layout != "hf":
            raise ExportError("--layout applies to model exports, not to adapters")
        return _export_adapter(run, out, base)
    if fmt == "merged" and layout == "original":
        raise ExportError("OpenAI's original layout stores experts in MXFP4 only; use --format mxfp4 for it")
    report = ExportReport(out, fmt)
    cfg = run.config.replace(quantization_config=dict(MXFP4_QUANTIZATION_CONFIG) if fmt == "mxfp4" else None)
    with CheckpointWriter(out, cfg, layout=layout, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in merged_tensors(run, fmt, report, requant=requant, calib_tokens=calib_tokens,
                                           calib_data=calib_data):
            writer.add(name, tensor)
        if layout == "hf":
            for fname in _SIDE_FILES:
                if (run.base.path / fname).is_file():
                    shutil.copy(run.base.path / fname, writer.tmp / fname)
        writer.close()
    return report


def _export_adapter(run: Run, out: Path, base: str | None) -> ExportReport:
    if run.adapter_dir is None:
        raise ExportError(f"{run.path} is a full fine-tuning run: it has no adapter (export merged or mxfp4)")
    with atomic_directory(out) as tmp:
        for f in run.adapter_dir.iterdir():
            shutil.copy(f, tmp / f.name)
        acfg = json.loads((tmp / "adapter_config.json").read_text())
        if base is not None:
            acfg["base_model_name_or_path"] = str(Path(base).resolve()) if Path(base).exists() else base
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_readme(acfg, out))
    return ExportReport(out, "adapter")


def adapter_readme(acfg: dict, out: Path) -> str:
    """How to use the adapter: transformers + PEFT, and vLLM."""
    base = acfg.get("base_model_name_or_path") or "openai/gpt-oss-20b"
    r = acfg["r"]
    experts = any("experts" in p for p in acfg.get("target_parameters") or [])
    router = any("router" in p for p in acfg.get("target_parameters") or [])
    lines = [
        "# gpt-oss LoRA adapter (gptoss-ft)",
        "",
        f"Base model: `{base}`. Rank {r}, alpha {acfg['lora_alpha']}; attention modules: "
        f"{', '.join(acfg.get('target_modules') or []) or 'none'}; parameters: "
        f"{', '.join(acfg.get('target_parameters') or []) or 'none'}.",
        "",
        "Expert LoRA uses PEFT's `target_parameters` layout for the 3-D expert tensors: per layer,",
        "`mlp.experts.base_layer.lora_A/B` adapt `gate_up_proj` and `mlp.experts.lora_A/B` adapt `down_proj`;",
        "`lora_A` is `[r*E, in]` (expert e = rows e*r .. e*r+r-1), `lora_B` is `[out, r*E]` (expert e = columns",
        "j*E + e). This is the layout PEFT writes for transformers' GptOss and the one vLLM reads.",
        "",
        "## transformers + PEFT",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto")',
        f'model = PeftModel.from_pretrained(base, "{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
        "## vLLM",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --max-lora-rank {max(r, 8)} --lora-modules tuned={out}",
        "```",
        "",
        "Then request `\"model\": \"tuned\"`. "
        + ("Expert LoRA needs a vLLM whose gpt-oss model loads 3-D MoE adapters (`is_3d_moe_weight`); "
           "with an older one, serve the merged export instead. " if experts else "")
        + ("vLLM does not adapt the router; for a router adapter serve `gptoss-ft export --format merged` "
           "or `--format mxfp4` instead. " if router else ""),
        "",
        "Or fold it in: `gptoss-ft export RUN_DIR --format merged|mxfp4 --out DIR`.",
        "",
    ]
    return "\n".join(lines)


# -- merged tensors, layer by layer ----------------------------------------------------------------

def merged_tensors(run: Run, fmt: str, report: ExportReport, *, requant: str = "gptq", calib_tokens: int = 2048,
                   calib_data: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged model (`fmt` "merged": dense bf16 experts; "mxfp4": experts in
    MXFP4, changed ones requantized by `requant`) in checkpoint order, computed one layer at a time.
    `export` and the GGUF writer consume it; `report` gets the counts."""
    calib = None
    if fmt == "mxfp4" and requant == "gptq" and (run.lora or run.tuned is not None):
        calib = _Calibration(run, _calibration_ids(run, calib_tokens, calib_data))
        report.calibration_tokens = calib.n_tokens
    cfg = run.config
    names = list(expected_shapes(cfg, experts="dense"))
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        if layer == 0:
            yield from ((n, _merged(run, n)) for n in names if not n.startswith("model.layers."))
        layer_names = [n for n in names if n.startswith(prefix)]
        for name in layer_names:
            if not name.endswith(EXPERT_PROJS):
                yield name, _merged(run, name)
        inputs = calib.layer_inputs(layer) if calib is not None else None
        if fmt == "merged":
            for proj in EXPERT_PROJS:
                yield prefix + "mlp.experts." + proj, _dense_experts(run, layer, proj)
        else:
            yield from _mxfp4_experts(run, layer, inputs, report)


def _merged(run: Run, name: str) -> torch.Tensor:
    """A non-expert tensor in bf16 with its LoRA folded in (no fp32 copy of tensors without LoRA:
    the embeddings are the largest tensors of the model)."""
    if name.removesuffix(".weight") not in run.lora:
        return run.source.get(name, torch.bfloat16)
    return _merged_f32(run, name).to(torch.bfloat16)


def _merged_f32(run: Run, name: str) -> torch.Tensor:
    """A non-expert tensor (floats in fp32) with its LoRA folded in: W + scaling * B A (PEFT's merge)."""
    t = run.source.get(name, torch.float32)
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in run.lora:
        a, b = run.lora[module]
        t = t + run.scaling * (b @ a)
    return t


def _expert_lora(run: Run, layer: int, proj: str):
    module = f"model.layers.{layer}.mlp.experts" + (".base_layer" if proj == "gate_up_proj" else "")
    if module not in run.lora:
        return None
    return lora_per_expert(*run.lora[module], run.config.num_local_experts)  # (A_e [r, in], B_e [out, r])


class _ExpertSource:
    """One layer's expert projection: the base's MXFP4 bytes (when it has them) and, per expert, the
    tuned weight `[out, in]` in fp32 and whether training changed it."""

    def __init__(self, run: Run, layer: int, proj: str):
        self.run, self.scaling = run, run.scaling
        name = f"model.layers.{layer}.mlp.experts.{proj}"
        self.base_mxfp4 = run.base.experts_format == "mxfp4"
        if self.base_mxfp4:
            self.blocks, self.scales = run.base.get(name + "_blocks"), run.base.get(name + "_scales")
        else:
            self.base_dense = run.base.get(name)  # [E, in, out]
        self.tuned = run.tuned.get_expert_weight(layer, proj, torch.float32) if run.tuned is not None else None
        self.lora = _expert_lora(run, layer, proj)

    def base_weight(self, e: int) -> torch.Tensor:
        if self.base_mxfp4:
            return mxfp4.dequantize(self.blocks[e], self.scales[e], torch.float32)  # [out, in]
        return self.base_dense[e].float().t()

    def weight(self, e: int) -> tuple[torch.Tensor, bool]:
        """(tuned weight [out, in] fp32, changed by training)."""
        if self.tuned is not None:
            w = self.tuned[e].t()
            return w, not torch.equal(w, self.base_weight(e))
        w = self.base_weight(e)
        if self.lora is None:
            return w, False
        a, b = self.lora[0][e], self.lora[1][e]  # [r, in], [out, r]
        delta = self.scaling * (b @ a)
        return w + delta, bool(delta.any())


def _dense_experts(run: Run, layer: int, proj: str) -> torch.Tensor:
    """Merged experts in HF's bf16 layout `[E, in, out]`, built one expert at a time."""
    src = _ExpertSource(run, layer, proj)
    e_count = run.config.num_local_experts
    first = src.weight(0)[0]
    out = torch.empty(e_count, first.shape[1], first.shape[0], dtype=torch.bfloat16)
    for e in range(e_count):
        out[e] = src.weight(e)[0].t()
    return out


def _mxfp4_experts(run: Run, layer: int, inputs, report: ExportReport) -> Iterator[tuple[str, torch.Tensor]]:
    """The layer's experts as MXFP4 `_blocks`/`_scales`: unchanged experts keep the base's
    bytes, changed ones are requantized (GPTQ when `inputs` holds calibration activations)."""
    prefix = f"model.layers.{layer}.mlp.experts."
    cfg = run.config
    gate_up, down = _ExpertSource(run, layer, "gate_up_proj"), _ExpertSource(run, layer, "down_proj")
    b1 = run.source.get(prefix + "gate_up_proj_bias", torch.float32)  # [E, 2I]
    out = {p: ([], []) for p in EXPERT_PROJS}
    for e in range(cfg.num_local_experts):
        w1, changed1 = gate_up.weight(e)  # [2I, H]
        x, gram1 = None, None
        if inputs is not None:
            x, gram1 = _expert_gram(inputs, e)
        _append(out["gate_up_proj"], gate_up, e, w1, changed1, gram1, report)
        w2, changed2 = down.weight(e)  # [H, I]
        gram2 = None
        if x is not None and changed2:
            # The down projection's inputs under the tuned gate_up (what the tuned model feeds it).
            act = swiglu_reference(x @ w1.t() + b1[e], cfg.swiglu_limit)  # [n, I]
            gram2 = _weighted_gram(act, inputs.weights_for(e))
        _append(out["down_proj"], down, e, w2, changed2, gram2, report)
    for proj in EXPERT_PROJS:
        blocks, scales = out[proj]
        yield prefix + proj + "_blocks", torch.stack(blocks)
        yield prefix + proj + "_scales", torch.stack(scales)


def _append(dest, src: _ExpertSource, e: int, w: torch.Tensor, changed: bool, gram, report: ExportReport) -> None:
    blocks, scales = dest
    if not changed and src.base_mxfp4:
        blocks.append(src.blocks[e].clone())
        scales.append(src.scales[e].clone())
        report.experts_copied += 1
        return
    base_scales = src.scales[e] if src.base_mxfp4 else None
    if not changed:  # a dense base: there are no bytes to keep, and nothing learned to protect
        b, s = mxfp4.quantize(w)
    elif gram is None:
        b, s = mxfp4.quantize(w)
        report.experts_requantized += 1
    else:
        b, s = gptq_quantize(w, gram, keep_scales=base_scales)
        report.experts_requantized += 1
    blocks.append(b)
    scales.append(s)


# -- GPTQ for MXFP4 --------------------------------------------------------------------------------

_FP4_MAGNITUDES = torch.tensor(mxfp4.FP4_VALUES[:8])
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2


def _round_fp4(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """w rounded to the nearest value of step * E2M1 (saturating at +-6 step); element-wise."""
    code = torch.bucketize((w / step).abs(), _FP4_MIDPOINTS.to(w.device))
    return torch.copysign(_FP4_MAGNITUDES.to(w.device)[code] * step, w)


def choose_scales(w: torch.Tensor, keep_scales: torch.Tensor | None) -> torch.Tensor:
    """Scale bytes `[out, G]` for `w [out, in]`: the kept scale of each block whose values it still
    covers (|w| <= 6 * scale: nothing clips), the searched nearest-rounding scale otherwise."""
    fresh = mxfp4.quantize(w)[1]
    if keep_scales is None:
        return fresh
    amax = w.abs().reshape(*keep_scales.shape, mxfp4.BLOCK).amax(-1)
    covers = amax <= 6.0 * torch.exp2(keep_scales.to(torch.float32) - mxfp4.SCALE_BIAS)
    return torch.where(covers, keep_scales, fresh)


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with U^T U = h^-1 (GPTQ's H^-1 factor) from one Cholesky and one triangular
    solve, instead of Cholesky, inverse, Cholesky (9x faster at 2880): with J the reversal,
    J chol(J h J) J = R is upper with h = R R^T, so h^-1 = (R^-1)^T R^-1 and U = R^-1."""
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(r, torch.eye(h.shape[0], dtype=h.dtype, device=h.device), upper=True)


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, *, keep_scales: torch.Tensor | None = None,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [out, in]` to MXFP4 minimising `||X (W - Q)^T||` for inputs with `gram = X^T X`.

    GPTQ (arXiv:2210.17323, Algorithm 1) with the block scales fixed up front by `choose_scales`:
    columns are rounded left to right; each column's error, divided by the pivot of the Cholesky
    factor of H^-1, is subtracted from the columns to its right (lazily, `block` columns at a time).
    `damp` * mean(diag H) is added to the diagonal, as in the paper, so few tokens still give a
    well-conditioned H. Returns (blocks [out, in/32, 16], scales [out, in/32]).
    """
    w = w.float()
    out_dim, in_dim = w.shape
    scales = choose_scales(w, keep_scales)
    step = torch.exp2(scales.to(torch.float32) - mxfp4.SCALE_BIAS)
    step = step.repeat_interleave(mxfp4.BLOCK, dim=1)  # [out, in]
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: their columns are simply rounded
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(in_dim, dtype=h.dtype, device=h.device)
    # "Act order" (the GPTQ authors' reference code): round the columns with the largest input
    # energy first, while the most later columns remain to absorb their error.
    perm = torch.argsort(torch.diagonal(h), descending=True)
    h, w, step = h[perm][:, perm], w[:, perm], step[:, perm]
    hinv = _upper_cholesky_of_inverse(h).to(w.dtype)
    w = w.clone()
    q = torch.empty_like(w)
    for i1 in range(0, in_dim, block):
        i2 = min(i1 + block, in_dim)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.empty(out_dim, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = _round_fp4(col, step[:, i1 + i])
            q[:, i1 + i] = qc
            err = (col - qc) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]  # back to the input order
    return mxfp4.quantize_with_scales(q, scales), scales


# -- calibration: the tuned model's expert inputs on training tokens ----------------------------

def _calibration_ids(run: Run, n_tokens: int, source: str | None) -> list[list[int]]:
    """About `n_tokens` tokens of whole training examples (the last one cut to fit), in file order."""
    import data as datalib

    d = run.data
    source = source or d.get("train")
    if not source:
        raise ExportError(f"{run.path}: the run names no training data; pass --calib-data FILE")
    if not Path(source).exists() and (run.path / source).exists():
        source = str(run.path / source)
    examples, _ = datalib.load_examples(
        source, d.get("format", "auto"), split=d.get("split", "train"), on_error="skip",
        split_turns=d.get("split_turns", True), loss_on=d.get("loss_on", "last_turn"),
        reasoning_effort=d.get("reasoning_effort"), max_seq_len=d.get("max_seq_len"))
    seqs, total = [], 0
    for ex in examples:
        if total >= n_tokens:
            break
        ids = ex.input_ids[: n_tokens - total]
        seqs.append(ids)
        total += len(ids)
    if not seqs:
        raise ExportError(f"no calibration examples in {source}")
    return seqs


@dataclass
class _ExpertInputs:
    x: torch.Tensor
    """[N, H] the experts' input (post-attention norm), fp32."""
    idx: torch.Tensor
    """[N, k] chosen experts."""
    weight: torch.Tensor
    """[N, k] routing weights."""

    def rows_for(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        token, slot = (self.idx == e).nonzero(as_tuple=True)
        return token, self.weight[token, slot].float()

    def weights_for(self, e: int) -> torch.Tensor:
        return self.rows_for(e)[1]


def _weighted_gram(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xw = x.double() * w.double().unsqueeze(1)
    return xw.t() @ xw


def _expert_gram(inputs: _ExpertInputs, e: int):
    token, w = inputs.rows_for(e)
    if token.numel() == 0:
        return None, None
    x = inputs.x[token]
    return x, _weighted_gram(x, w)


class _Calibration:
    """Runs the tuned model one decoder layer at a time over the calibration tokens (packed into one
    row, attention kept within each example) and hands out each layer's expert inputs."""

    def __init__(self, run: Run, seqs: list[list[int]]):
        self.run = run
        ids = torch.tensor([t for s in seqs for t in s]).unsqueeze(0)  # [1, N]
        self.position_ids = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
        self.n_tokens = ids.shape[1]
        embed = run.source.get("model.embed_tokens.weight")
        self.x = embed[ids].float()  # [1, N, H]
        del embed
        self.cos, self.sin = RotaryEmbedding(run.config)(self.position_ids, torch.float32)
        self.masks = attention_masks(self.position_ids, run.config)
        self.next_layer = 0

    @torch.no_grad()
    def layer_inputs(self, layer: int) -> _ExpertInputs:
        if layer != self.next_layer:
            raise RuntimeError("calibration runs the layers in order")
        captured = []
        module = self._tuned_layer(layer)
        hook = module.mlp.experts.register_forward_hook(lambda mod, args, out: captured.append(args))
        self.x, _ = module(self.x, self.cos, self.sin, self.masks, "eager")
        hook.remove()
        self.next_layer += 1
        x, idx, weight = captured[0]
        return _ExpertInputs(x, idx, weight)

    def _tuned_layer(self, layer: int) -> DecoderLayer:
        """Decoder layer `layer` of the tuned model in fp32: the base's (or full run's) tensors, LoRA
        merged into attention and router, expert LoRA attached as trained (experts stay MXFP4)."""
        run, src = self.run, self.run.source
        fmt = "mxfp4" if src.experts_format == "mxfp4" else "dequantized"
        with torch.device("meta"):
            module = DecoderLayer(run.config, layer, experts=fmt, dtype=torch.float32)
        prefix = f"model.layers.{layer}."
        state = {}
        for name in module.state_dict():
            full = prefix + name
            if name.endswith(EXPERT_PROJS) and fmt == "dequantized":
                state[name] = src.get_expert_weight(layer, name.rsplit(".", 1)[1], torch.float32)
            else:
                state[name] = _merged_f32(run, full)
        module.load_state_dict(state, assign=True)
        experts = module.mlp.experts
        gate_up, down = (run.lora.get(prefix + "mlp.experts" + s) for s in (".base_layer", ""))
        if gate_up is not None or down is not None:
            r = (gate_up or down)[0].shape[0] // run.config.num_local_experts
            experts.add_lora(r, 1.0)
            experts.lora_scaling = run.scaling
            zero = torch.zeros_like
            for holder, ab in ((experts.base_layer, gate_up), (experts, down)):
                a, b = ab if ab is not None else (zero(holder.lora_A.weight), zero(holder.lora_B.weight))
                holder.lora_A.weight.copy_(a)
                holder.lora_B.weight.copy_(b)
        return module

