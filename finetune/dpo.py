"""Direct preference optimization: the loss on sequence log-probabilities of chosen and rejected completions.

    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1, loss="sigmoid")

pc / pr: the policy's summed log-probabilities of each pair's chosen / rejected completion (only the
completion's trained tokens, `model.loss`), rc / rr the reference model's. The implicit rewards are
beta * (policy - reference) log-ratios; the formulas follow TRL's DPOTrainer, which the tests use as
the oracle:
- sigmoid: DPO (Rafailov et al., arXiv:2305.18290, eq. 7), -log sigmoid(beta * margin), where
  margin = (pc - rc) - (pr - rr).
- ipo: IPO (Azar et al., arXiv:2310.12036, eq. 17), (margin' - 1 / (2 beta))^2 with each log-ratio
  divided by its completion's token count (TRL's normalisation, which the IPO authors confirmed).
- hinge: SLiC (Zhao et al., arXiv:2305.10425), max(0, 1 - beta * margin).
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import data as datalib
from model.checkpoint import atomic_file
from model.lora import adapters_disabled
from model.loss import sequence_sums

from .objectives import Data, Objective, forward, load_split, stat

LOSSES = ("sigmoid", "ipo", "hinge")
"""`dpo.loss`: which preference loss."""


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None):
    """Per-pair losses `[B]` and the chosen and rejected rewards `[B]` (detached). `chosen_tokens` /
    `rejected_tokens`: completion lengths `[B]`, needed by ipo."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# -- the objective ----------------------------------------------------------------------------------

def _fingerprint(rows: list) -> str:
    """The pairs' count and a CRC-32 of every token id and mask, in order (C speed: seconds for 10^9 tokens)."""
    crc = 0
    for _, _, p in rows:
        for ex in (p.chosen, p.rejected):
            crc = zlib.crc32(np.asarray(ex.input_ids, dtype=np.int32).tobytes(), crc)
            crc = zlib.crc32(np.asarray(ex.loss_mask, dtype=np.int8).tobytes(), crc)
    return f"{len(rows)} pairs, crc32 {crc:08x}"


class DPO(Objective):
    """Preference pairs -> `dpo_loss`, averaged over the step's pairs. Each micro-batch runs its
    chosen and rejected completions as one batch of 2B rows (no packing: each row is one sequence).

    The reference log-probs are computed once, before the first step, with the same forward as the
    policy (adapters switched off for `dpo.reference: base`), and kept in the run directory
    (`reference_logps.safetensors`): no second model in memory, and a resumed run reads them back
    instead of recomputing them from weights that have since moved.
    """

    name = "dpo"
    eval_stats = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
    REFERENCE_FILE = "reference_logps.safetensors"

    def load(self, cfg) -> Data:
        d = cfg.data
        train, evals, report = load_split(cfg, lambda source, split: datalib.load_pairs(
            source, d.format, split=split, subset=d.subset, on_error=d.on_error, loss_on=d.loss_on, reasoning_effort=d.reasoning_effort,
            max_seq_len=d.max_seq_len, truncation=d.truncation), "preference pairs")
        # rows carry their split and index: the reference log-probs are looked up by them
        return Data([("train", i, p) for i, p in enumerate(train)], [("eval", i, p) for i, p in enumerate(evals)],
                    report)

    def prepare(self, model, data: Data, accelerator, run) -> None:
        path = run.path / self.REFERENCE_FILE
        # What the saved log-probs were computed for: the reference, and each split's pairs and tokens
        # (a changed file or reference gives other figures and is recomputed, never reused by mistake).
        what = {"reference": self.cfg.dpo.reference, "adapter": str(self.cfg.model.adapter),
                **{split: _fingerprint(rows) for split, rows in (("train", data.train_rows), ("eval", data.eval_rows))}}
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if f.metadata() == what:
                    self.reference = {k: f.get_tensor(k) for k in f.keys()}
                    return
            accelerator.print(f"{path}: computed for other pairs or another reference; recomputing")
        self.reference = {}
        for split, rows in (("train", data.train_rows), ("eval", data.eval_rows)):
            if rows:
                self.reference[split] = self._reference_logps(model, rows, accelerator)
        if accelerator.is_main_process:
            with atomic_file(path) as tmp:
                save_file(self.reference, str(tmp), metadata=what)
        accelerator.wait_for_everyone()

    @torch.no_grad()
    def _reference_logps(self, model, rows: list, accelerator) -> torch.Tensor:
        """[N, 2] (chosen, rejected) summed log-probs of every pair; each process computes every
        world-th pair and the results are gathered."""
        world, rank, b = accelerator.num_processes, accelerator.process_index, self.cfg.train.batch_size
        per = -(-len(rows) // world)
        mine = [rows[i % len(rows)] for i in range(rank * per, rank * per + per)]  # wraps: equal shapes to gather
        off = adapters_disabled(accelerator.unwrap_model(model)) if self.cfg.dpo.reference == "base" and \
            self.cfg.tuning == "lora" else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        out = []
        with off:
            for i in range(0, len(mine), b):
                chosen, rejected, _, _ = self._logps(model, self.batch(model, mine[i:i + b], step=0, micro=0))
                out.append(torch.stack([chosen, rejected], 1).float())
        model.train(was_training)
        every = accelerator.gather(torch.cat(out).to(self.device)).cpu()  # [world * per, 2], rank-major
        return every[: len(rows)].contiguous()

    def batch(self, model, rows: list, *, step: int, micro: int) -> dict:
        pairs = [p for _, _, p in rows]
        b = datalib.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
        b["split"] = rows[0][0]
        b["index"] = torch.tensor([i for _, i, _ in rows])
        return b

    def count(self, batch: dict) -> int:
        return len(batch["index"])

    def _logps(self, model, batch: dict, *, aux: bool = False):
        out = forward(model, batch, self.device, aux=aux)
        seq = sequence_sums(out.token_logprobs, out.trained)  # [2B]
        tokens = out.trained.sum(1)
        n = len(batch["index"])
        return seq[:n], seq[n:], (tokens[:n], tokens[n:]), out

    def loss(self, model, batch: dict, *, aux: bool = False):
        chosen, rejected, (nc, nr), out = self._logps(model, batch, aux=aux)
        ref = self.reference[batch["split"]][batch["index"]].to(chosen.device)
        losses, rc, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.cfg.dpo.beta,
                                  loss=self.cfg.dpo.loss, chosen_tokens=nc, rejected_tokens=nr)
        n = len(losses)
        total = losses.sum()
        stats = {"loss": stat(total, n), "rewards_chosen": stat(rc.sum(), n), "rewards_rejected": stat(rr.sum(), n),
                 "reward_margin": stat((rc - rr).sum(), n), "reward_accuracy": stat((rc > rr).sum(), n)}
        return total, stats, out.aux_loss
