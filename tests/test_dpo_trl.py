"""DPO against TRL's DPOTrainer (the oracle): loss, rewards and LoRA gradients on the same model,
adapter and preference pairs.

Ours: the tiny random gpt-oss with a saved PEFT adapter (random nonzero lora_B) loaded the way the
trainer loads `model.adapter` (`finetune.trainer.load_model`), our `DPO` objective with
`dpo.reference: base`: reference log-probs computed once by `DPO.prepare` (adapters off), then
`DPO.batch` + `DPO.loss` (our forward, `model.loss.sequence_sums`, `dpo_loss`) on the pairs that
`data.load_pairs` renders.

TRL: transformers' `GptOssForCausalLM` (MXFP4 dequantized, fp32) on the same checkpoint, a real
`DPOTrainer` built with `peft_config` = the adapter's LoraConfig (target_modules q/k/v/o and
target_parameters for the experts), whose LoRA weights are then set to the adapter's
(`peft.set_peft_model_state_dict`). Passing `peft_config` is what makes TRL's reference "adapters
disabled" (`use_adapter(model, None)` -> `disable_adapter()`); handing it an already-loaded
`PeftModel` instead would make TRL copy the adapter into a "ref" adapter (the initial policy, our
`dpo.reference: initial`), whose log-ratios are all 0 at the first step. The reference is computed on
the fly inside TRL's `_compute_loss` (`precompute_ref_log_probs=False`). The batch is built by TRL
itself: its `_prepare_dataset` tokenizes the rows and splits prompt from completion
(`common_prefix_length`), its `DataCollatorForPreference` pads them, and `trainer.compute_loss` runs
`_compute_loss`, whose loss value is returned and whose rewards/logps land in `trainer._metrics`.

The one stand-in: TRL tokenizes text with a Hugging Face tokenizer, and Harmony rendering is ours
(checked token by token against openai-harmony in test_data_preference.py). So each of our token ids
i is written as the word "t{i}" and TRL gets a word-level tokenizer with exactly those words: its
own tokenization then reproduces our ids (checked below), and its prompt/completion split equals our
loss mask (prompt = everything up to and including `<|start|>assistant`, completion = the rest, all
of it trained; checked). TRL's router load-balancing term is switched off (`router_aux_loss_coef=0.0`):
by default TRL adds the model config's `router_aux_loss_coef` (nonzero for gpt-oss: transformers'
default 0.001 here, where the checkpoint does not set it) times the MoE aux loss; ours
(`train.aux_loss_coef`) defaults to 0.

Compared, for loss in sigmoid / ipo / hinge (hinge at beta 0.5, so some pairs sit past the hinge):
the batch's mean loss, mean chosen and rejected rewards, mean margin and reward accuracy (TRL's
`rewards/*` metrics); per pair, the chosen and rejected rewards, margins, accuracies and policy
log-probs (the `[B]` tensors TRL gathers before logging their means, observed on their way through
`accelerator.gather`); and the gradient of every LoRA parameter after backward of each side's loss.
Tolerance: fp32 on both sides, and the two models' log-probs agree to ~1e-7 relative; rewards are
beta x (policy - reference) differences, so cancellation leaves them ~2e-5 relative apart. Asserted:
|ours - TRL| <= 1e-4 + 1e-4 |TRL| for losses, rewards, margins and log-probs (measured worst:
losses 8e-7, per-pair margins 4e-5 relative); reward accuracy equal (every margin is > 1e-3 away
from 0); each LoRA gradient within 1e-4 of TRL's in relative norm (measured worst ~3e-6).

One deviation from TRL as it runs on CPU, for speed: its fused LM head scores only the labeled
positions on CUDA/XPU ("compact", chosen by `trl.trainer.utils._use_triton`) and every position
elsewhere, zeroing the unlabeled ones afterwards. The test takes the CUDA branch of that one decision
(monkeypatched): the same per-position arithmetic, but not ~8 s per loss of scoring prompt positions
against a 201088-token vocabulary. TRL's kernels stay its torch (non-Triton) versions.
"""

import types

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import data as datalib  # noqa: E402
import model as modellib  # noqa: E402
from finetune.config import from_dict  # noqa: E402
from finetune.dpo import DPO, LOSSES, dpo_loss  # noqa: E402
from finetune.objectives import Data  # noqa: E402
from finetune.run import save_adapter  # noqa: E402
from finetune.trainer import load_model  # noqa: E402
from model.lora import PEFT_PREFIX  # noqa: E402

VOCAB = 201088
ROWS = [  # explicit prompt/completion rows; completions are assistant messages only (TRL trains a suffix)
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "It is 5, I think."},
    {"prompt": "Capital of France?", "chosen": [{"role": "assistant", "thinking": "Easy one.", "content": "Paris"}],
     "rejected": "Lyon"},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of the sky?"}],
     "chosen": "Blue.", "rejected": "The sky is green on most days."},
]
BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.5}  # hinge: some pairs past the hinge (beta * margin > 1)
RTOL, ATOL, GRAD_RTOL = 1e-4, 1e-4, 1e-4


def _word_tokenizer():
    """A Hugging Face tokenizer that reads "t{id}" words back as `id`: our renders as TRL's text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # <|return|> ends every completion, so TRL's "append EOS unless present" appends nothing
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t200002", pad_token="t199999")


def _words(ids):
    return " ".join(f"t{i}" for i in ids)


def _cfg(base, adapter, out, loss):
    return from_dict({"model": {"path": str(base), "adapter": str(adapter)},
                      "data": {"train": "pairs.jsonl", "format": "preference"}, "output_dir": str(out),
                      "method": "dpo", "dpo": {"beta": BETA[loss], "loss": loss, "reference": "base"},
                      "train": {"batch_size": len(ROWS)}}, check_paths=False)


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    """The adapter (random nonzero lora_B, saved PEFT-style), the rendered pairs, and our model
    loaded as the trainer loads it, with the reference log-probs `DPO.prepare` computes."""
    from accelerate import Accelerator

    tmp = tmp_path_factory.mktemp("dpo_trl")
    torch.manual_seed(0)
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
    modellib.add_lora(m, r=4, alpha=8, targets=("attention", "experts"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = save_adapter(m, tmp / "adapter", base_model=str(tiny_hf))

    pairs, report = datalib.load_pairs(ROWS)
    assert report.examples == len(ROWS)
    records = []
    for p in pairs:
        n = p.chosen.loss_mask.index(1)
        for side in (p.chosen, p.rejected):  # TRL's completion mask is [0] * prompt + [1] * completion
            assert side.input_ids[:n] == p.chosen.input_ids[:n] and side.loss_mask == [0] * n + [1] * (len(side) - n)
        records.append({"prompt": _words(p.chosen.input_ids[:n]), "chosen": " " + _words(p.chosen.input_ids[n:]),
                        "rejected": " " + _words(p.rejected.input_ids[n:])})

    cfg = _cfg(tiny_hf, adapter, tmp / "run", "sigmoid")
    ours = load_model(cfg, torch.device("cpu"))  # the trainer's loader: model.adapter attached, LoRA trainable
    rows = [("train", i, p) for i, p in enumerate(pairs)]
    (tmp / "run").mkdir()
    objective = DPO(cfg, torch.device("cpu"))
    objective.prepare(ours, Data(rows, [], ""), Accelerator(cpu=True), types.SimpleNamespace(path=tmp / "run"))
    return types.SimpleNamespace(base=tiny_hf, adapter=adapter, pairs=pairs, rows=rows, records=records,
                                 model=ours, reference=objective.reference, tmp=tmp)


def _trl_trainer(s, loss):
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(s.base, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.float32)
    lora = peft.LoraConfig.from_pretrained(str(s.adapter))
    lora.inference_mode = False
    args = trl.DPOConfig(output_dir=str(s.tmp / f"trl-{loss}"), beta=BETA[loss], loss_type=[loss], use_cpu=True,
                         bf16=False, gradient_checkpointing=False, router_aux_loss_coef=0.0, max_length=None,
                         per_device_train_batch_size=len(ROWS), report_to="none", save_strategy="no",
                         precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(s.records),
                             processing_class=_word_tokenizer(), peft_config=lora)
    loaded = peft.set_peft_model_state_dict(trainer.model, load_file(str(s.adapter / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if ".lora_" in k]
    return trainer


def _trl_step(trainer, examples):
    """TRL's collator on its own tokenized rows, then its loss. Returns (loss, metrics, per_pair):
    the metrics that call logged, and for each per-pair metric the `[B]` tensor TRL averaged into it,
    observed on its way through `accelerator.gather` (TRL gathers each per-pair tensor before taking
    the mean it logs; the tensor is identified by that mean, bit for bit, not by call order)."""
    trainer._metrics["train"].clear()
    seen = []
    gather = trainer.accelerator.gather

    def record(x):
        seen.append(x.detach().clone())
        return gather(x)

    trainer.accelerator.gather = record
    try:
        batch = trainer._prepare_inputs(trainer.data_collator(examples))
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        trainer.accelerator.gather = gather
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    per_pair = {}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        found = [x for x in seen if x.shape == (len(examples),) and x.float().mean().item() == metrics[key]]
        assert found, f"no gathered per-pair tensor averages to TRL's {key}"
        per_pair[key] = found[0]
    return loss, metrics, per_pair


def _close(ours, theirs, what):
    ours, theirs = (torch.as_tensor(x).detach().double() for x in (ours, theirs))
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: ours {ours} TRL {theirs}\n{m}")


@pytest.mark.parametrize("loss", LOSSES)
def test_dpo_loss_rewards_and_gradients_equal_trl(setup, loss, monkeypatch):
    s = setup
    # TRL's CUDA choice of positions to score (the docstring says why)
    import trl.trainer.utils

    monkeypatch.setattr(trl.trainer.utils, "_use_triton", lambda device: True)
    cfg = _cfg(s.base, s.adapter, s.tmp / "run", loss)
    objective = DPO(cfg, torch.device("cpu"))
    objective.reference = s.reference
    m = s.model
    m.train()
    m.zero_grad(set_to_none=True)
    batch = objective.batch(m, s.rows, step=0, micro=0)
    total, stats, _ = objective.loss(m, batch)
    n = objective.count(batch)
    (total / n).backward()  # the trainer divides the step's summed loss by its pairs
    ours = {k: float(v[0] / v[1]) for k, v in stats.items()}
    ours_grads = {PEFT_PREFIX + k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():  # per pair, from the same sums the objective uses
        chosen, rejected, (nc, nr), _ = objective._logps(m, batch)
        ref = s.reference["train"]
        pair_losses, pair_rc, pair_rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=BETA[loss], loss=loss,
                                                 chosen_tokens=nc, rejected_tokens=nr)
    _close(float(pair_losses.mean()), ours["loss"], "per-pair losses vs the objective's mean")
    margins = pair_rc - pair_rr
    assert margins.abs().min() > 1e-3, "a margin near 0 makes the accuracy comparison fragile"
    if loss == "hinge":
        assert (pair_losses == 0).any() and (pair_losses > 0).any(), "the hinge's both sides are exercised"

    trainer = _trl_trainer(s, loss)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for ex, p in zip(examples, s.pairs):  # TRL's tokenization and split give our ids and masks
        assert ex["prompt_ids"] + ex["chosen_ids"] == p.chosen.input_ids
        assert ex["prompt_ids"] + ex["rejected_ids"] == p.rejected.input_ids
        assert len(ex["chosen_ids"]) == sum(p.chosen.loss_mask) and len(ex["rejected_ids"]) == sum(p.rejected.loss_mask)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    theirs_loss, theirs, per_pair = _trl_step(trainer, examples)  # all pairs in one padded batch
    theirs_loss.backward()

    _close(ours["loss"], theirs_loss.item(), "loss")
    _close(ours["rewards_chosen"], theirs["rewards/chosen"], "rewards/chosen")
    _close(ours["rewards_rejected"], theirs["rewards/rejected"], "rewards/rejected")
    _close(ours["reward_margin"], theirs["rewards/margins"], "rewards/margins")
    assert ours["reward_accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=1e-6)
    # pair by pair (a mean can hide errors that cancel); with the mean loss above, the per-pair
    # rewards (and, for ipo, the token counts checked above) fix every pair's loss
    _close(pair_rc, per_pair["rewards/chosen"], "per-pair chosen rewards")
    _close(pair_rr, per_pair["rewards/rejected"], "per-pair rejected rewards")
    _close(margins, per_pair["rewards/margins"], "per-pair margins")
    assert torch.equal((margins > 0).float(), per_pair["rewards/accuracies"].float())
    _close(chosen, per_pair["logps/chosen"], "per-pair policy log-probs, chosen")
    _close(rejected, per_pair["logps/rejected"], "per-pair policy log-probs, rejected")

    theirs_grads = {k.replace(".default.", "."): p.grad for k, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(theirs_grads) == set(ours_grads)
    assert all(theirs_grads[k] is not None and g.norm() > 0 for k, g in ours_grads.items())
    errors = {k: float((g - theirs_grads[k]).norm() / theirs_grads[k].norm()) for k, g in ours_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"LoRA gradient {worst}: |ours - TRL| / |TRL| = {errors[worst]:.2e}"
