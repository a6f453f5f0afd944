"""One DPO training step with LoRA (attention + experts, r=16) of a scaled gpt-oss: ours against TRL's
`DPOTrainer` with PEFT on transformers' `GptOssForCausalLM`, on the same checkpoint, pairs and batch.

    python -m benchmarks.bench_dpo [--quick] [--steps N] [--precompute-peer] [--json PATH]

The model is bench_train_step's (gpt-oss-20b's vocabulary 201088, 32 experts top-4, head size 64, at
hidden 512 and 4 layers). The batch is 2 preference pairs: a shared 384-token prompt per pair,
chosen completions of 128 tokens and rejected of 96, so each step runs 4 rows of <= 512 tokens
(2 x 512 + 2 x 480 tokens) with ~23% of them trained. --quick: 2 layers and half of every length
(TRL's CPU step scores every position against the whole vocabulary, whatever the depth). Tokens are
random ids (speed does not depend on which), the same on both sides. Both sides run fp32 on CPU,
sigmoid loss, beta 0.1, reference = the base model (adapters off), LoRA B = 0 at the start (PEFT's
init), AdamW lr 1e-4, gradient clipping at 1.0, no gradient checkpointing, no router
load-balancing loss.

- ours: `finetune.trainer.load_model` (experts stay MXFP4, decoded per expert on the fly; LoRA as
  `add_lora`), the `finetune.dpo.DPO` objective built from a `finetune.config` Config: `prepare`
  computes the reference log-probs once for the data (adapters off), then each step is
  `objective.batch` + `objective.loss` (policy forward of chosen + rejected as one batch, logits only
  at trained targets), backward of the loss over the step's pairs, clipping and AdamW, as
  `finetune/trainer.py` runs them.
- TRL (peer): `DPOTrainer(model=GptOssForCausalLM.from_pretrained(quantization_config=
  Mxfp4Config(dequantize=True)), peft_config=LoraConfig(same r, alpha, target_modules q/k/v/o,
  target_parameters mlp.experts.gate_up_proj/down_proj))`, `trainer.train()` with TRL's collator,
  loss, optimizer and loop. Settings that differ from TRL's defaults, to time the same computation:
  `bf16=False` (TRL defaults to bf16 autocast; ours is fp32 on CPU), `gradient_checkpointing=False`
  (TRL's default is True, ours False), `router_aux_loss_coef=0` (TRL's default is the model config's,
  nonzero for gpt-oss; ours 0), `precompute_ref_log_probs=False` (TRL's default: the reference forward, with
  adapters disabled, runs inside every step). TRL needs a Hugging Face tokenizer even for token ids:
  it gets a word-level one that reads "t{id}" back as id (its tokenized rows are checked to be ours;
  its 201088-word vocabulary adds a few tens of MB to TRL's resident set).

The reference forward: TRL's default runs it in every step; ours runs it once per pair before
training. Both are reported: ours' `step_s` is the step alone, `ref_s` the one-off reference pass over
the pairs of one step (the first forward of the process, so it also pays warm-up costs), and the
headline tokens/s charges ours that pass on every step (`step_s + ref_s`: what one epoch costs; over
E epochs it is ref_s / E per step), against TRL's step with its reference forward inside.
`--precompute-peer` also runs TRL with `precompute_ref_log_probs=True` (its one-off reference pass is
inside `DPOTrainer.__init__`, reported as `init_s`), the like-for-like comparison for ours' step alone.

CPU only: on CPU TRL's fused LM head scores every position of every row against the vocabulary and
zeroes the unlabeled ones (torch tiles of [tokens, 32768]); on CUDA it scores only the labeled
positions, with Triton kernels. Most of TRL's CPU step time and resident set here is that, so these
ratios do not carry over to GPUs.

Each side runs in its own process. Speed = non-padding input tokens of the step's rows / step time
(best of the timed steps: 2, --quick 1; after one warm-up step). TRL's step is timed from
`on_step_begin` to `on_step_end` (forward, reference forward, backward, clipping, optimizer and
scheduler step); ours around the same work plus building the batch. Peak memory = the process's
highest resident set (VmHWM) over load, the reference pass and the steps; the step-only peak (reset
after the warm-up step) is reported too. The first step's mean chosen/rejected policy log-probs
(adapters' B = 0, so the base model's) must agree between the sides: the same computation is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import reset_peak, status, timed_steps
from benchmarks.bench_train_step import QUICK_SHAPE, SHAPE, build_checkpoint

R, ALPHA, BETA, LR = 16, 32, 0.1, 1e-4
SIZES = {  # preference pairs per step, shared prompt, chosen and rejected completion lengths (tokens)
    "default": dict(pairs=2, prompt=384, chosen=128, rejected=96),
    # half the tokens: TRL's step on CPU scores every position against the 201088-token vocabulary,
    # which costs the same at any depth, so fewer layers alone would not make --quick quick
    "quick": dict(pairs=2, prompt=192, chosen=64, rejected=48),
}
VOCAB = 201088
SIDES = ("ours", "trl", "trl_precompute")


def pairs_tokens(size: dict, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) random token ids; the same on both sides. Completions end with
    <|return|> (200002), which TRL then does not append as EOS."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, 199998, (n,), generator=g).tolist()

    return [(ids(size["prompt"]), ids(size["chosen"] - 1) + [200002], ids(size["rejected"] - 1) + [200002])
            for _ in range(size["pairs"])]


def _input_tokens(size: dict) -> int:
    return size["pairs"] * (2 * size["prompt"] + size["chosen"] + size["rejected"])


def _ours(path: Path, size: dict, steps: int, tmp: Path) -> dict:
    from accelerate import Accelerator

    import data as datalib
    from finetune.config import from_dict
    from finetune.dpo import DPO
    from finetune.objectives import Data
    from finetune.trainer import load_model

    t0 = time.perf_counter()
    cfg = from_dict({"model": {"path": str(path), "experts": "mxfp4"},
                     "data": {"train": "pairs.jsonl", "format": "preference"}, "output_dir": str(tmp / "run"),
                     "method": "dpo", "lora": {"r": R, "alpha": ALPHA, "targets": ["attention", "experts"]},
                     "dpo": {"beta": BETA, "loss": "sigmoid", "reference": "base"},
                     "train": {"batch_size": size["pairs"], "lr": LR, "max_grad_norm": 1.0}}, check_paths=False)
    device = torch.device("cpu")
    m = load_model(cfg, device)
    load_s = time.perf_counter() - t0
    rows = []
    for i, (p, c, r) in enumerate(pairs_tokens(size)):
        rows.append(("train", i, datalib.PreferencePair(
            datalib.Example(p + c, [0] * len(p) + [1] * len(c), i),
            datalib.Example(p + r, [0] * len(p) + [1] * len(r), i), i)))
    objective = DPO(cfg, device)
    (tmp / "run").mkdir(parents=True, exist_ok=True)

    class _Run:  # what prepare reads of a run directory
        path = tmp / "run"

    t = time.perf_counter()
    objective.prepare(m, Data(rows, [], ""), Accelerator(cpu=True), _Run())
    ref_s = time.perf_counter() - t
    first = {"logps/chosen": float(objective.reference["train"][:, 0].mean()),
             "logps/rejected": float(objective.reference["train"][:, 1].mean())}
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    m.train()

    def step() -> float:
        b = objective.batch(m, rows, step=0, micro=0)
        total, stats, _ = objective.loss(m, b)
        (total / objective.count(b)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(stats["loss"][0] / stats["loss"][1])

    return _timed(step, steps, load_s=load_s, ref_s=ref_s, first_logps=first, trainable=sum(p.numel() for p in params))


def _timed(step, steps: int, **extra) -> dict:
    return {**timed_steps(step, steps), **extra}


def _word_tokenizer():
    """A Hugging Face tokenizer that reads "t{id}" words back as `id` (TRL tokenizes text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t200002", pad_token="t199999")


def _trl(path: Path, size: dict, steps: int, tmp: Path, precompute: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import GptOssForCausalLM, Mxfp4Config, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    def words(ids):
        return " ".join(f"t{i}" for i in ids)

    pairs = pairs_tokens(size)
    t0 = time.perf_counter()
    m = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ds = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                            for p, c, r in pairs])
    args = DPOConfig(output_dir=str(tmp / "trl"), beta=BETA, loss_type=["sigmoid"], learning_rate=LR, max_grad_norm=1.0,
                     per_device_train_batch_size=size["pairs"], max_steps=1 + steps, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, router_aux_loss_coef=0.0, precompute_ref_log_probs=precompute,
                     max_length=None, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0)
    tokenizer = _word_tokenizer()
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    trainer = DPOTrainer(model=m, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    init_s = time.perf_counter() - t  # dataset tokenization, PEFT wrapping, and with precompute the reference pass
    for ex, (p, c, r) in zip(trainer.train_dataset, pairs):  # TRL's tokenization gives our ids
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == (p, c, r)

    marks = {"begin": [], "end": [], "warm_peak": None}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if len(marks["end"]) == 1:  # after the warm-up step: the step-only peak starts here
                marks["warm_peak"] = status("VmHWM:")
                reset_peak()
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks["end"].append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    step_peak = status("VmHWM:")
    times = [e - b for b, e in zip(marks["begin"][1:], marks["end"][1:])]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    first = {k: logs[0][k] for k in ("logps/chosen", "logps/rejected")}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"step_s": min(times), "step_times": times, "first_loss": logs[0]["loss"], "load_s": load_s,
            "init_s": init_s, "ref_s": None, "first_logps": first, "trainable": trainable,
            "peak_rss_bytes": max(marks["warm_peak"], step_peak), "step_peak_rss_bytes": step_peak}


def run_side(side: str, path: Path, size: dict, steps: int) -> dict:
    torch.manual_seed(0)
    base = status("VmRSS:")
    with tempfile.TemporaryDirectory(prefix=f"bench_dpo_{side}_") as tmp:
        if side == "ours":
            r = _ours(path, size, steps, Path(tmp))
        else:
            r = _trl(path, size, steps, Path(tmp), precompute=side == "trl_precompute")
    tokens = _input_tokens(size)
    r.update(side=side, tokens=tokens, tokens_per_s=tokens / r["step_s"], base_rss_bytes=base,
             threads=torch.get_num_threads())
    if side == "ours":  # the reference pass charged to every step (one epoch)
        r["tokens_per_s_with_ref"] = tokens / (r["step_s"] + r["ref_s"])
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 4, half the tokens, one timed step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (default 2, quick 1)")
    ap.add_argument("--precompute-peer", action="store_true",
                    help="also run TRL with precompute_ref_log_probs=True (a third process)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (1 if args.quick else 2)  # TRL's CPU step is ~1 min
    size = SIZES["quick" if args.quick else "default"]
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.path), size, steps)))
        return {}
    sides = SIDES if args.precompute_peer else SIDES[:2]
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        path = build_checkpoint(Path(tmp) / "model", args.quick)
        results = {}
        for side in sides:
            cmd = [sys.executable, "-m", "benchmarks.bench_dpo", "--side", side, "--path", str(path),
                   "--steps", str(steps)]
            cmd += ["--quick"] if args.quick else []
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, peer = results["ours"], results["trl"]
    shape = QUICK_SHAPE if args.quick else SHAPE
    agree = max(abs(ours["first_logps"][k] - peer["first_logps"][k]) / abs(peer["first_logps"][k])
                for k in ("logps/chosen", "logps/rejected"))
    out = {
        "shape": {**shape, "vocab_size": VOCAB, **size, "input_tokens": _input_tokens(size),
                  "trained_tokens": size["pairs"] * (size["chosen"] + size["rejected"]), "lora_r": R,
                  "dtype": "float32"},
        "results": results,
        # headline: ours with the one-off reference pass charged to every step, against TRL's step
        # with its reference forward inside
        "speed_ratio": ours["tokens_per_s_with_ref"] / peer["tokens_per_s"],
        "speed_ratio_step_only": ours["tokens_per_s"] / peer["tokens_per_s"],
        "memory_ratio": ours["peak_rss_bytes"] / peer["peak_rss_bytes"],
        "step_memory_ratio": ours["step_peak_rss_bytes"] / peer["step_peak_rss_bytes"],
        # B = 0 on both sides: the first step's policy log-probs are the base model's, and must agree
        "first_logps_rel_diff": agree,
    }
    if "trl_precompute" in results:
        pre = results["trl_precompute"]
        out["speed_ratio_vs_precompute"] = ours["tokens_per_s"] / pre["tokens_per_s"]
        out["memory_ratio_vs_precompute"] = ours["peak_rss_bytes"] / pre["peak_rss_bytes"]
    print(f"DPO LoRA step, {shape['num_hidden_layers']} layers H={shape['hidden_size']} E={shape['num_local_experts']} "
          f"top-{shape['num_experts_per_tok']} V={VOCAB}, {size['pairs']} pairs ({size['prompt']}-token prompt, "
          f"{size['chosen']}/{size['rejected']}-token completions), r={R}, fp32 CPU, {ours['threads']} threads")
    for side, res in results.items():
        ref = (f"  reference pass {res['ref_s']:.2f} s" if side == "ours" else
               f"  trainer init {res['init_s']:.2f} s"
               + (" (with its reference pass)" if side == "trl_precompute" else ""))
        print(f"  {side:14s} {res['tokens_per_s']:8.1f} tokens/s  step {res['step_s']:.2f} s{ref}  "
              f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB (step-only {res['step_peak_rss_bytes'] / 2**30:.2f})  "
              f"first loss {res['first_loss']:.4f}  trainable {res['trainable']:,}")
    print(f"  ours with its reference pass charged to the step: {ours['tokens_per_s_with_ref']:.1f} tokens/s")
    print(f"  speed {out['speed_ratio']:.2f}x (ours step + reference pass vs TRL step; goal >= 1.5x), step only "
          f"{out['speed_ratio_step_only']:.2f}x; peak RSS {out['memory_ratio']:.2f}x (goal <= 0.5x); "
          f"first-step log-probs agree to {agree:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
