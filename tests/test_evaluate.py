"""Generation-based evaluation: batched greedy decoding equals one-at-a-time decoding; accuracy counts."""

from pathlib import Path

import torch

import model as modellib
from finetune.evaluate import Probe, accuracy, load_probes
from finetune.generate import generate, generate_batch

ROOT = Path(__file__).resolve().parents[1]


def test_batched_greedy_equals_one_at_a_time(tiny_hf):
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="mxfp4").eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 200000, (3, 20), generator=g).tolist()
    batched = generate_batch(m, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, batched):
        assert out == generate(m, prompt, max_new_tokens=12)


def test_accuracy_counts_exact_final_answers(tiny_hf):
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="mxfp4").eval()
    probes = load_probes(str(ROOT / "recipes" / "data" / "quickstart_eval.jsonl"), data_format="messages", limit=4)
    assert len(probes) == 4 and all(p.answer for p in probes)
    from data.tokenizer import START, get_tokenizer

    assert probes[0].prompt[-2:] == [START, *get_tokenizer().encode_ordinary("assistant")]
    report = accuracy(m, probes, max_new_tokens=4)
    assert report.accuracy == 0.0 and report.n == 4  # a random model does not answer
    # A "model" that always completes with a probe's reference answer gets exactly that probe right.
    target = probes[1]
    from data.tokenizer import CHANNEL, MESSAGE, RETURN

    answer = [CHANNEL, *get_tokenizer().encode_ordinary("final"), MESSAGE,
              *get_tokenizer().encode_ordinary(target.answer), RETURN]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.step = 0

        def forward(self, ids, cache=None, **_):
            logits = torch.zeros(ids.shape[0], ids.shape[1], 201088)
            logits[:, -1, answer[min(self.step, len(answer) - 1)]] = 1.0
            self.step += 1
            return type("Out", (), {"logits": logits})

    report = accuracy(Scripted(), [target, Probe(target.prompt + [1], "something else")], max_new_tokens=10)
    assert report.accuracy == 0.5


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    from finetune.generate import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    draws = sample(logits, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: the tail is never drawn
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    again = sample(logits, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert sample(logits[:2], temperature=0).tolist() == [0, 0]
    everything = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert set(everything.tolist()) == {0, 1, 2, 3}
