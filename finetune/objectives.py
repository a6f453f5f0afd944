"""Training methods as objectives for the one training loop (`finetune/trainer.py`).

An objective says how a method's rows become micro-batches and a loss; the loop does the rest
(accumulation, clipping, checkpoints, logging) the same way for every method:

    data = objective.load(cfg)                         # train and eval rows
    objective.prepare(model, data, accelerator, run)   # once: e.g. DPO's reference log-probs
    batch = objective.batch(model, rows, step=s, micro=k)
    n = objective.count(batch)                         # units the step's loss is a mean over
    loss_sum, stats, aux = objective.loss(model, batch, aux=...)

The step's loss is sum(loss_sum) / sum(n) over all micro-batches and processes, so it does not
depend on how the global batch is split. `stats` are (sum, count) pairs, summed the same way and
logged as sum / count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import data as datalib
from model.loss import count_trained


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what is intact."""


@dataclass
class Data:
    train_rows: list
    eval_rows: list
    report: str


def load_split(cfg, load, what: str) -> tuple[list, list, str]:
    """Train and eval rows of a method whose rows stand alone (pairs, prompts): `load(source, split)`
    -> (rows, report) reads data.train, and data.eval or, with eval_fraction, a seeded held-out
    share of train. Returns (train, eval, report text). The loader is given data.format (auto is
    the method's generic format) and data.subset by the caller."""
    d = cfg.data
    train, report = load(d.train, d.split)
    lines, evals = [f"train {d.train}: {report}"], []
    if d.eval is not None:
        evals, ereport = load(d.eval, d.eval_split)
        lines.append(f"eval {d.eval}: {ereport}")
    elif d.eval_fraction > 0:
        n = max(1, round(len(train) * d.eval_fraction))
        held = set(datalib.shuffle(range(len(train)), cfg.train.seed)[:n])
        train, evals = [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
        lines.append(f"eval: {n} {what} held out of train (eval_fraction {d.eval_fraction})")
    if not train:
        raise TrainingError(f"no {what} in {d.train} ({report})")
    return train, evals, "\n".join(lines)


def forward(model, batch: dict, device, *, aux: bool = False):
    """The model on a collated batch (input_ids, labels, position_ids) moved to `device`."""
    return model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                 position_ids=batch["position_ids"].to(device), return_aux_loss=aux)


def stat(total, count) -> torch.Tensor:
    """A (sum, count) pair for `stats`."""
    return torch.stack([torch.as_tensor(total, dtype=torch.float64).detach().cpu(),
                        torch.as_tensor(count, dtype=torch.float64)])


class Objective:
    """The interface every method implements; see the module docstring."""

    name = "objective"
    eval_stats: tuple[str, ...] = ("loss",)
    """The keys of `evaluate`'s stats."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device

    def load(self, cfg) -> Data:
        raise NotImplementedError

    def prepare(self, model, data: Data, accelerator, run) -> None:
        """Work done once before the first step (and again on resume, from what it saved)."""

    def batch(self, model, rows: list, *, step: int, micro: int) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        raise NotImplementedError

    def loss(self, model, batch: dict, *, aux: bool = False):
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, rows: list, batch_size: int) -> dict[str, torch.Tensor]:
        """`stats` over held-out rows (this process's share), logged with the prefix eval_: by default
        the training loss and stats of each batch of rows, without gradients."""
        return sum_stats(self.loss(model, self.batch(model, rows[i:i + batch_size], step=0, micro=0))[1]
                         for i in range(0, len(rows), batch_size))

    def after_log(self, step: int, logger) -> None:
        """Called after each logged step (GRPO writes sample rollouts)."""


class SFT(Objective):
    """Supervised fine-tuning: the mean cross-entropy of every trained token of the step."""

    name = "sft"

    def load(self, cfg) -> Data:
        d = cfg.data
        # Every process of a run loads the same way: the first to arrive renders into the cache, the
        # others wait for it and map the same arrays (data.store), so nothing here depends on the rank.
        common = dict(format=d.format, subset=d.subset, on_error=d.on_error, split_turns=d.split_turns, loss_on=d.loss_on,
                      reasoning_effort=d.reasoning_effort, max_seq_len=d.max_seq_len, truncation=d.truncation,
                      num_proc=d.num_proc, cache_dir=(d.cache_dir or datalib.default_cache_dir()) if d.cache else None)
        train, report = datalib.load_examples(d.train, split=d.split, **common)
        lines = [f"train {d.train}: {report}"]
        if d.eval is not None:
            evals, ereport = datalib.load_examples(d.eval, split=d.eval_split, **common)
            lines.append(f"eval {d.eval}: {ereport}")
        elif d.eval_fraction > 0:
            # Whole rows are held out: a row's examples (one per turn) share prefixes, so splitting
            # examples would leak eval text into training.
            n_rows = max(1, round(train.num_rows * d.eval_fraction))
            train, evals = datalib.train_eval_split(train, n_rows, seed=cfg.train.seed)
            lines.append(f"eval: {n_rows} rows ({len(evals)} examples) held out of train "
                         f"(eval_fraction {d.eval_fraction})")
        else:
            evals = []
        if not train:
            raise TrainingError(f"no training examples in {d.train} ({report})")
        if d.packing:
            train, evals = datalib.pack_examples(train, d.max_seq_len), datalib.pack_examples(evals, d.max_seq_len)
        return Data(train, evals, "\n".join(lines))

    def batch(self, model, rows: list, *, step: int, micro: int) -> dict:
        return datalib.collate(rows)

    def count(self, batch: dict) -> int:
        return count_trained(batch["labels"], batch["position_ids"])

    def loss(self, model, batch: dict, *, aux: bool = False):
        out = forward(model, batch, self.device, aux=aux)
        total = -out.token_logprobs.sum() if out.n_tokens else out.loss  # (a zero reaching every parameter)
        return total, {"loss": stat(total, out.n_tokens)}, out.aux_loss


def sum_stats(stats) -> dict[str, torch.Tensor]:
    """Several `stats` dicts added key by key."""
    out: dict[str, torch.Tensor] = {}
    for s in stats:
        for k, v in s.items():
            out[k] = out[k] + v if k in out else v.clone()
    return out
