"""The merged model of a run, streamed tensor by tensor: what the merged, MXFP4 and GGUF exports write.

Streaming: every output tensor is computed from the base `Checkpoint` (memory-mapped, read tensor
by tensor) plus the adapter, one layer at a time, and handed on. Peak memory is about one layer's
tensors plus what the consumer holds (a `CheckpointWriter`'s pending shard, the GGUF writer's
current layer), never the whole model in bf16. A full fine-tuning run's
`model/` is the source instead of base + adapter; the base is still read so that unchanged experts
can be recognised.

Requantization (docs/ARCHITECTURE.md §6), for experts in MXFP4:
- an expert projection training did not change is copied from the base byte for byte;
- a changed one is rounded by GPTQ (`model.gptq`, keeping the base's block scales where they still
  fit) on its inputs in the tuned model (`finetune.calibration`), or to nearest when asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model import mxfp4
from model.checkpoint import expected_shapes
from model.experts import EXPERT_PROJS, lora_per_expert, swiglu_reference
from model.gptq import batch_size_for, gptq_quantize

from .calibration import Calibration, ExpertInputs, calibration_ids, expert_gram, weighted_gram
from .run import Run


@dataclass
class ExportReport:
    """What an export wrote; `merged_tensors` fills in the expert counts."""

    path: Path
    format: str
    experts_copied: int = 0
    """Expert projections (one expert's gate_up or down) copied byte for byte from the base."""
    experts_requantized: int = 0
    calibration_tokens: int = 0


def merged_tensors(run: Run, fmt: str, report: ExportReport, *, requant: str = "gptq", calib_tokens: int = 2048,
                   calib_data: str | None = None,
                   progress: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged model (`fmt` "merged": dense bf16 experts; "mxfp4": experts in
    MXFP4, changed ones requantized by `requant`) in checkpoint order, computed one layer at a time.
    `export` and the GGUF writer consume it; `report` gets the counts; `progress` a line per layer
    (a full-size GPTQ export takes a while)."""
    calib = None
    if fmt == "mxfp4" and requant == "gptq" and (run.lora or run.tuned is not None):
        calib = Calibration(run, calibration_ids(run, calib_tokens, calib_data), _merged_f32)
        report.calibration_tokens = calib.n_tokens
    cfg = run.config
    names = list(expected_shapes(cfg, experts="dequantized"))
    start = time.perf_counter()
    for layer in range(cfg.num_hidden_layers):
        if progress is not None and layer:
            progress(f"export: {layer}/{cfg.num_hidden_layers} layers done ({time.perf_counter() - start:.0f} s)")
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


def _mxfp4_experts(run: Run, layer: int, inputs: ExpertInputs | None,
                   report: ExportReport) -> Iterator[tuple[str, torch.Tensor]]:
    """The layer's experts as MXFP4 `_blocks`/`_scales`: unchanged experts keep the base's
    bytes, changed ones are requantized (GPTQ when `inputs` holds calibration activations).

    Experts go through in groups of `gptq.batch_size_for` (GPTQ rounds a group's matrices together),
    so only a group's tuned weights and grams are held in fp32, not the layer's."""
    prefix = f"model.layers.{layer}.mlp.experts."
    cfg = run.config
    gate_up, down = _ExpertSource(run, layer, "gate_up_proj"), _ExpertSource(run, layer, "down_proj")
    b1 = run.source.get(prefix + "gate_up_proj_bias", torch.float32)  # [E, 2I]
    out = {p: ([], []) for p in EXPERT_PROJS}
    group = batch_size_for(2 * cfg.intermediate_size, cfg.hidden_size)
    for first in range(0, cfg.num_local_experts, group):
        experts = range(first, min(first + group, cfg.num_local_experts))
        ups, xs = {}, {}
        for e in experts:
            w1, changed1 = gate_up.weight(e)  # [2I, H]
            xs[e], gram1 = expert_gram(inputs, e) if inputs is not None else (None, None)
            ups[e] = (w1, changed1, gram1)
        _requantize(gate_up, ups, out["gate_up_proj"], report)
        downs = {}
        for e in experts:
            w2, changed2 = down.weight(e)  # [H, I]
            gram2 = None
            if xs[e] is not None and changed2:
                # The down projection's inputs under the tuned gate_up (what the tuned model feeds it).
                act = swiglu_reference(xs[e] @ ups[e][0].t() + b1[e], cfg.swiglu_limit)  # [n, I]
                gram2 = weighted_gram(act, inputs.weights_for(e))
            downs[e] = (w2, changed2, gram2)
        del ups, xs
        _requantize(down, downs, out["down_proj"], report)
    for proj in EXPERT_PROJS:
        blocks, scales = out[proj]
        yield prefix + proj + "_blocks", torch.stack(blocks)
        yield prefix + proj + "_scales", torch.stack(scales)


def _requantize(src: _ExpertSource, experts: dict, dest, report: ExportReport) -> None:
    """Append to `dest` (blocks, scales lists) the MXFP4 of each expert in `experts` (e -> tuned
    weight, changed, gram or None), in order: the base's bytes when unchanged, GPTQ (all of the
    group's at once) when changed with calibration inputs, nearest rounding otherwise."""
    done, gptq = {}, []
    for e, (w, changed, gram) in experts.items():
        if not changed and src.base_mxfp4:
            done[e] = (src.blocks[e].clone(), src.scales[e].clone())
            report.experts_copied += 1
        elif changed and gram is not None:
            gptq.append(e)
            report.experts_requantized += 1
        else:  # changed without calibration rows (nearest), or a dense base's unchanged expert (no
            done[e] = mxfp4.quantize(w)  # bytes to keep, nothing learned to protect: not counted)
            report.experts_requantized += changed
    if gptq:
        keep = torch.stack([src.scales[e] for e in gptq]) if src.base_mxfp4 else None
        blocks, scales = gptq_quantize(torch.stack([experts[e][0] for e in gptq]),
                                       torch.stack([experts[e][2] for e in gptq]), keep_scales=keep)
        done.update({e: (b, s) for e, b, s in zip(gptq, blocks, scales)})
    for e in experts:
        dest[0].append(done[e][0])
        dest[1].append(done[e][1])
