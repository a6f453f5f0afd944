"""Calibration for requantizing experts: the tuned model's expert inputs on tokens of the run's own
training data, which GPTQ (`model.gptq`) needs as `X^T X`.

The tuned model is run one decoder layer at a time (only one layer's weights in fp32 at once), so
each layer sees the inputs the tuned layers before it produce. Each token's row is weighted by its
routing weight: an expert's rounding error reaches the layer's output scaled by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.experts import EXPERT_PROJS
from model.modeling import DecoderLayer, RotaryEmbedding, segment_masks

from .run import ExportError, Run


def calibration_ids(run: Run, n_tokens: int, source: str | None) -> list[list[int]]:
    """About `n_tokens` tokens of whole training examples (the last one cut to fit), in file order."""
    import data as datalib

    d = run.data
    if source is None and d is None:
        raise ExportError(f"{run.path}: the run names no training data; pass --calib-data FILE")
    source = source or d.train
    if not Path(source).exists() and (run.path / source).exists():
        source = str(run.path / source)
    common = dict(split=d.split if d else "train", subset=d.subset if d else None, on_error="skip", reasoning_effort=d.reasoning_effort if d else None)
    # the token sequences the run trained on: examples, the chosen side of preference pairs, or prompts
    if run.objective == "dpo":
        pairs, _ = datalib.load_pairs(source, d.format, loss_on=d.loss_on, max_seq_len=d.max_seq_len, **common)
        sequences = [p.chosen.input_ids for p in pairs]
    elif run.objective == "grpo":
        sequences = [p.prompt for p in datalib.load_prompts(source, d.format, **common)[0]]
    else:
        examples, _ = datalib.load_examples(
            source, d.format if d else "auto", split_turns=d.split_turns if d else True,
            loss_on=d.loss_on if d else "last_turn", max_seq_len=d.max_seq_len if d else None, **common)
        sequences = (ex.input_ids for ex in examples)  # built one at a time from the arrays, as far as needed
    seqs, total = [], 0
    for seq in sequences:
        if total >= n_tokens:
            break
        ids = seq[: n_tokens - total]
        seqs.append(ids)
        total += len(ids)
    if not seqs:
        raise ExportError(f"no calibration examples in {source}")
    return seqs


@dataclass
class ExpertInputs:
    """One layer's expert inputs on the calibration tokens, and where the router sent each token."""

    x: torch.Tensor
    """[N, H] the experts' input (post-attention norm), fp32."""
    idx: torch.Tensor
    """[N, k] chosen experts."""
    weight: torch.Tensor
    """[N, k] routing weights."""

    def rows_for(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens routed to expert `e`, their routing weights for it)."""
        token, slot = (self.idx == e).nonzero(as_tuple=True)
        return token, self.weight[token, slot].float()

    def weights_for(self, e: int) -> torch.Tensor:
        return self.rows_for(e)[1]


def weighted_gram(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`X^T X` in fp64 for the rows of `x [n, d]` each scaled by `w [n]`."""
    xw = x.double() * w.double().unsqueeze(1)
    return xw.t() @ xw


def expert_gram(inputs: ExpertInputs, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(expert `e`'s input rows, their weighted gram); (None, None) when no token reached it."""
    token, w = inputs.rows_for(e)
    if token.numel() == 0:
        return None, None
    x = inputs.x[token]
    return x, weighted_gram(x, w)


class Calibration:
    """Runs the tuned model one decoder layer at a time over the calibration tokens (packed into one
    row, attention kept within each example) and hands out each layer's expert inputs.

    `tensor(run, name)` gives the tuned model's non-expert tensor `name` in fp32 with its LoRA folded
    in (the merge's own fold, passed in because the merge is what drives calibration).
    """

    def __init__(self, run: Run, seqs: list[list[int]], tensor: Callable[[Run, str], torch.Tensor]):
        self.run, self.tensor = run, tensor
        ids = torch.tensor([t for s in seqs for t in s]).unsqueeze(0)  # [1, N]
        self.position_ids = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
        self.n_tokens = ids.shape[1]
        embed = run.source.get("model.embed_tokens.weight")
        self.x = embed[ids].float()  # [1, N, H]
        del embed
        self.cos, self.sin = RotaryEmbedding(run.config)(self.position_ids, torch.float32)
        # The CPU flash kernel over query chunks, as training runs: eager attention would hold
        # heads x N x N scores (1 GiB per copy at gpt-oss-20b's 64 heads and 2048 tokens).
        self.masks = segment_masks(self.position_ids, run.config)
        self.next_layer = 0

    @torch.no_grad()
    def layer_inputs(self, layer: int) -> ExpertInputs:
        if layer != self.next_layer:
            raise RuntimeError("calibration runs the layers in order")
        captured = []
        module = self._tuned_layer(layer)
        hook = module.mlp.experts.register_forward_hook(lambda mod, args, out: captured.append(args))
        self.x, _ = module(self.x, self.cos, self.sin, self.masks, "sdpa")
        hook.remove()
        self.next_layer += 1
        x, idx, weight = captured[0]
        return ExpertInputs(x, idx, weight)

    def _tuned_layer(self, layer: int) -> DecoderLayer:
        """Decoder layer `layer` of the tuned model in fp32: the base's (or full run's) tensors, LoRA
        merged into attention and router, expert LoRA attached as trained (experts stay MXFP4)."""
        run, src = self.run, self.run.source
        fmt = src.experts_format
        with torch.device("meta"):
            module = DecoderLayer(run.config, layer, experts=fmt, dtype=torch.float32)
        prefix = f"model.layers.{layer}."
        state = {}
        for name in module.state_dict():
            if name.endswith(EXPERT_PROJS) and fmt == "dequantized":
                state[name] = src.get_expert_weight(layer, name.rsplit(".", 1)[1], torch.float32)
            else:
                state[name] = self.tensor(run, prefix + name)
        module.load_state_dict(state, assign=True)
        gate_up, down = (run.lora.get(prefix + "mlp.experts" + s) for s in (".base_layer", ""))
        if gate_up is not None or down is not None:
            module.mlp.experts.set_lora(gate_up, down, run.scaling)
        return module
