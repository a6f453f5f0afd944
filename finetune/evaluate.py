"""Generation-based evaluation: exact-match accuracy of the final answer on held-out prompts.

Each held-out row is rendered like training data (its last assistant turn is the reference); the
model greedily completes the prompt (everything before the first trained token, ending with
`<|start|>assistant`) and its `final` message is compared with the reference's, whitespace stripped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .generate import STOP_IDS, parse_completion, prompt_of


@dataclass
class Probe:
    prompt: list[int]
    answer: str


@dataclass
class AccuracyReport:
    accuracy: float
    n: int
    samples: list[dict] = field(default_factory=list)
    """The first few (prompt tail, expected, got) for the summary."""


def load_probes(source: str, *, data_format: str = "auto", limit: int | None = None) -> list[Probe]:
    """Prompts and reference final answers from a dataset (any row format `data` reads)."""
    import data as datalib

    examples, _ = datalib.load_examples(source, format=data_format, split_turns=False, loss_on="last_turn")
    probes = []
    for e in examples[:limit]:
        prompt = prompt_of(e.input_ids, e.loss_mask)
        answer = parse_completion(e.input_ids[len(prompt):]).final
        if answer is not None:
            probes.append(Probe(prompt, answer.strip()))
    if not probes:
        raise ValueError(f"{source}: no held-out rows end with a final answer to compare against")
    return probes


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of prompts of one length, decoded together with one KV cache (rows share
    positions, so no padding is needed); each row stops at `<|return|>` or `<|call|>`."""
    from model import KVCache

    device = next(model.parameters()).device
    cache = KVCache()
    logits = model(torch.tensor(prompts, device=device), cache=cache).logits[:, -1]
    outs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1).cpu()
        for row, tok in enumerate(tokens.tolist()):
            if not done[row]:
                outs[row].append(tok)
        done |= torch.isin(tokens, torch.tensor(STOP_IDS))
        if done.all():
            break
        logits = model(tokens.view(-1, 1).to(device), cache=cache).logits[:, -1]
    return outs


@torch.no_grad()
def accuracy(model, probes: list[Probe], *, max_new_tokens: int = 64, batch_size: int = 32) -> AccuracyReport:
    """Greedy exact-match accuracy; prompts of equal length are decoded as one batch."""
    was_training = model.training
    model.eval()
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(probes):
        by_length.setdefault(len(p.prompt), []).append(i)
    got: dict[int, str | None] = {}
    for group in by_length.values():
        for j in range(0, len(group), batch_size):
            rows = group[j:j + batch_size]
            for i, out in zip(rows, greedy_batch(model, [probes[i].prompt for i in rows], max_new_tokens=max_new_tokens)):
                final = parse_completion(out).final
                got[i] = final.strip() if final is not None else None
    model.train(was_training)
    hits = sum(got[i] == p.answer for i, p in enumerate(probes))
    samples = [{"expected": p.answer, "got": got[i]} for i, p in enumerate(probes[:5])]
    return AccuracyReport(hits / len(probes), len(probes), samples)
