"""Group relative policy optimization (Shao et al., arXiv:2402.03300) with verifiable rewards.

Each micro-batch takes `train.batch_size` prompts; for each, `grpo.num_generations` completions are
sampled from the current policy (the batched KV-cache generator, `finetune.generate`), scored by
the reward functions (`finetune.rewards`), and each completion's advantage is its reward minus its
group's mean, divided by the group's std (`grpo.scale_rewards`; Dr. GRPO, arXiv:2503.20783, drops
the division). The loss is PPO's clipped surrogate per completion token,

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_k3(policy || reference),

with ratio = pi / pi_old. Normalisation is per token over the whole step (DAPO, arXiv:2503.14476):
every completion token of the step weighs the same, so long completions are not down-weighted as
GRPO's per-sequence mean does. The policy is updated once per rollout batch, so pi_old is the
policy that sampled (its log-probs, detached) and the ratio is 1 in value; its gradient is
A * d log pi. The reference for the KL term is the base model with adapters switched off, run
without gradients on the same tokens (only when beta > 0).

Sampling draws from a generator seeded by (train.seed, step, micro-batch, process, prompt), so a
killed and resumed run samples the same completions as an uninterrupted one.
"""

from __future__ import annotations

import json

import torch

import data as datalib
from data.tokenizer import get_tokenizer
from model.lora import adapters_disabled
from model.loss import count_trained

from .generate import generate_grouped
from .objectives import Data, Objective, TrainingError, forward, load_split, stat, sum_stats
from .rewards import Completion, load_reward, score


def _seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (a polynomial hash; distinct for distinct tuples
    within any realistic range)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2 ** 63 - 25)
    return h


class GRPO(Objective):
    name = "grpo"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        g = cfg.grpo
        self.rewards = {spec.rsplit(":", 1)[-1]: load_reward(spec) for spec in g.rewards}
        if len(self.rewards) != len(g.rewards):
            raise TrainingError(f"grpo.rewards: two rewards share a function name ({list(g.rewards)})")
        self.weights = list(g.reward_weights or [1.0] * len(g.rewards))
        self.eval_stats = ("reward", *(f"reward_{n}" for n in self.rewards), "completion_length")
        self.recent: list[dict] = []
        self.rank, self.unwrap, self.rollouts_path = 0, (lambda m: m), None

    def load(self, cfg) -> Data:
        d = cfg.data
        return Data(*load_split(cfg, lambda source, split: datalib.load_prompts(
            source, d.format, split=split, subset=d.subset, on_error=d.on_error, reasoning_effort=d.reasoning_effort,
            max_prompt_len=cfg.grpo.max_prompt_len), "prompts"))

    def prepare(self, model, data: Data, accelerator, run) -> None:
        self.rank, self.unwrap, self.rollouts_path = accelerator.process_index, accelerator.unwrap_model, run.rollouts

    # -- rollouts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _rollouts(self, model, rows: list, *, greedy: bool, seed: tuple[int, ...] = ()) -> list[tuple]:
        """(row, completion ids) per completion: num_generations samples of each prompt, or one
        greedy completion each; prompts of equal length decode together."""
        g = self.cfg.grpo
        policy = self.unwrap(model)
        was_training = policy.training
        policy.eval()
        n = 1 if greedy else g.num_generations
        prompts = [row.prompt for row in rows for _ in range(n)]
        sampling = {} if greedy else dict(temperature=g.temperature, top_p=g.top_p,
                                           generator=torch.Generator().manual_seed(_seed(*seed)))
        completions = generate_grouped(policy, prompts, max_new_tokens=g.max_new_tokens,
                                       batch_size=max(32, g.num_generations), **sampling)
        policy.train(was_training)
        return [(row, c) for row, c in zip([row for row in rows for _ in range(n)], completions)]

    def _score(self, rollouts: list[tuple]) -> torch.Tensor:
        """Rewards `[n_functions, n_completions]`."""
        rows = [r for r, _ in rollouts]
        completions = [Completion.from_tokens(c) for _, c in rollouts]
        keys = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows] for k in keys}
        prompts = [r.given for r in rows]
        where = [f"row {r.row}" for r in rows]
        return torch.tensor(score(self.rewards, completions, prompts, columns, where), dtype=torch.float64)

    def batch(self, model, rows: list, *, step: int, micro: int) -> dict:
        g = self.cfg.grpo
        rollouts = self._rollouts(model, rows, greedy=False, seed=(self.cfg.train.seed, step, micro, self.rank))
        per_fn = self._score(rollouts)  # [F, R]
        reward = (torch.tensor(self.weights, dtype=torch.float64)[:, None] * per_fn).sum(0)  # [R]
        groups = reward.view(-1, g.num_generations)
        advantage = groups - groups.mean(1, keepdim=True)
        std = groups.std(1, keepdim=True)  # unbiased, as TRL
        if g.scale_rewards:
            advantage = advantage / (std + 1e-4)
        b = datalib.collate([datalib.Example(r.prompt + c, [0] * len(r.prompt) + [1] * len(c), r.row)
                             for r, c in rollouts])
        b["advantages"] = advantage.reshape(-1).float()
        lengths = torch.tensor([len(c) for _, c in rollouts], dtype=torch.float64)
        n, groups_n = len(rollouts), groups.shape[0]
        fn_std = per_fn.view(len(self.rewards), groups_n, g.num_generations).std(-1).sum(-1)  # [F]
        b["stats"] = {"reward": stat(reward.sum(), n), "reward_std": stat(std.sum(), groups_n),
                      "completion_length": stat(lengths.sum(), n),
                      **{f"reward_{name}": stat(per_fn[k].sum(), n) for k, name in enumerate(self.rewards)},
                      **{f"reward_{name}_std": stat(fn_std[k], groups_n) for k, name in enumerate(self.rewards)}}
        if g.beta > 0:
            with torch.no_grad(), adapters_disabled(self.unwrap(model)):
                b["ref_logps"] = forward(model, b, self.device).token_logprobs.detach()
        self.recent = [{"step": step + 1, "row": r.row, "prompt": get_tokenizer().decode(r.prompt),
                        "completion": get_tokenizer().decode(c), "reward": float(reward[i]),
                        "advantage": float(b["advantages"][i]),
                        **{f"reward_{name}": float(per_fn[k, i]) for k, name in enumerate(self.rewards)}}
                       for i, (r, c) in enumerate(rollouts[: g.log_rollouts])]
        return b

    def count(self, batch: dict) -> int:
        # every completion token of the step weighs the same (the masks hold exactly those tokens)
        return count_trained(batch["labels"], batch["position_ids"])

    def loss(self, model, batch: dict, *, aux: bool = False):
        g = self.cfg.grpo
        out = forward(model, batch, self.device, aux=aux)
        logp = out.token_logprobs  # [n]: every completion token
        rows = out.trained.nonzero(as_tuple=True)[0]
        adv = batch["advantages"].to(logp.device)[rows]
        ratio = torch.exp(logp - logp.detach())  # pi / pi_old: 1 in value, d log pi in gradient
        clipped = ratio.clamp(1 - g.clip_eps, 1 + g.clip_eps)
        per_token = -torch.min(ratio * adv, clipped * adv)
        n = logp.numel()
        stats = dict(batch["stats"])
        if g.beta > 0:
            d = batch["ref_logps"].to(logp.device) - logp
            kl = torch.exp(d) - d - 1  # k3: an unbiased, non-negative estimate of KL(pi || ref)
            per_token = per_token + g.beta * kl
            stats["kl"] = stat(kl.sum(), n)
        total = per_token.sum()
        stats["loss"] = stat(total, n)
        stats["clip_fraction"] = stat(((ratio < 1 - g.clip_eps) | (ratio > 1 + g.clip_eps)).sum(), n)
        return total, stats, out.aux_loss

    @torch.no_grad()
    def evaluate(self, model, rows: list, batch_size: int) -> dict[str, torch.Tensor]:
        """Greedy completions of the held-out prompts, scored by the reward functions."""
        stats = []
        for i in range(0, len(rows), batch_size):
            rollouts = self._rollouts(model, rows[i:i + batch_size], greedy=True)
            per_fn = self._score(rollouts)
            reward = (torch.tensor(self.weights, dtype=torch.float64)[:, None] * per_fn).sum(0)
            n = len(rollouts)
            stats.append({"reward": stat(reward.sum(), n),
                          "completion_length": stat(sum(len(c) for _, c in rollouts), n),
                          **{f"reward_{name}": stat(per_fn[k].sum(), n) for k, name in enumerate(self.rewards)}})
        return sum_stats(stats)

    def after_log(self, step: int, logger) -> None:
        """A few of the step's rollouts (this process's last micro-batch) to rollouts.jsonl and wandb."""
        if not logger.main or not self.recent:
            return
        with open(self.rollouts_path, "a") as f:
            for r in self.recent:
                f.write(json.dumps(r) + "\n")
        if logger.wandb is not None:
            import wandb

            cols = list(self.recent[0])
            logger.wandb.log({"rollouts": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in self.recent])},
                             step=step)
