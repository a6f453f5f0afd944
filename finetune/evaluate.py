"""Generation-based evaluation: exact-match accuracy of the final answer on held-out prompts.

Each held-out row is rendered like training data (its last assistant turn is the reference); the
model greedily completes the prompt (everything before the first trained token, ending with
`<|start|>assistant`) and its `final` message is compared with the reference's, whitespace stripped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .generate import generate_grouped, parse_completion, prompt_of


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
def accuracy(model, probes: list[Probe], *, max_new_tokens: int = 64, batch_size: int = 32) -> AccuracyReport:
    """Greedy exact-match accuracy; prompts of equal length are decoded as one batch."""
    was_training = model.training
    model.eval()
    outs = generate_grouped(model, [p.prompt for p in probes], max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.train(was_training)
    got = [parse_completion(out).final for out in outs]
    got = [g.strip() if g is not None else None for g in got]
    hits = sum(g == p.answer for g, p in zip(got, probes))
    samples = [{"expected": p.answer, "got": g} for g, p in list(zip(got, probes))[:5]]
    return AccuracyReport(hits / len(probes), len(probes), samples)
