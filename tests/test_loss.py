"""model.loss: target log-probs against float64 log_softmax, for SFT's uniform and DPO/GRPO's per-sequence weights."""

import pytest
import torch

from model.loss import IGNORE_INDEX, count_trained, sequence_sums, target_logprobs, trained_targets


def _inputs(n=11, h=6, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64),
            torch.randint(0, v, (n,), generator=g))


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("need_w", [True, False])
def test_target_logprobs_values_and_gradients_match_log_softmax(uniform, need_w):
    h, w, y = _inputs()
    upstream = torch.full((h.shape[0],), -0.3, dtype=torch.float64) if uniform else \
        torch.linspace(-1.0, 2.0, h.shape[0], dtype=torch.float64)
    grads = []
    for fn in ("ours", "reference"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(need_w)
        if fn == "ours":
            logp = target_logprobs(hh, ww, y, chunk=4)  # 3 chunks, the last one short
        else:
            logp = torch.log_softmax(hh @ ww.t(), dim=-1).gather(1, y[:, None]).squeeze(1)
        (logp * upstream).sum().backward()
        grads.append((logp.detach().double(), hh.grad, ww.grad))
    (lo, gh, gw), (lr, rh, rw) = grads
    torch.testing.assert_close(lo, lr, rtol=0, atol=1e-5)  # fp32 logits
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)
    if need_w:
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    else:
        assert gw is None


def test_without_grad_gives_the_same_values():
    h, w, y = _inputs()
    with torch.no_grad():
        a = target_logprobs(h, w, y, chunk=5)
    b = target_logprobs(h.clone().requires_grad_(), w, y, chunk=5)
    assert torch.equal(a, b.detach())


def test_trained_targets_skips_unlabeled_and_packed_boundaries():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 8, 9, 10]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])  # a second example starts at index 3
    # target t+1: 6 (kept), -100 (unlabeled), 8 (first token of the next example), 9, 10
    assert trained_targets(labels, positions).tolist() == [[True, False, False, True, True]]
    assert count_trained(labels, positions) == 3


def test_sequence_sums_puts_each_target_in_its_row():
    trained = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    values = torch.tensor([1.0, 2.0, 10.0, 20.0])
    assert sequence_sums(values, trained).tolist() == [3.0, 0.0, 30.0]


def test_model_loss_is_the_mean_of_token_logprobs_and_counts_agree(tiny_hf):
    import model

    m = model.from_pretrained(tiny_hf, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    positions = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, 12)  # two packed examples per row
    out = m(ids, labels=labels, position_ids=positions)
    assert out.n_tokens == count_trained(labels, positions) == out.token_logprobs.numel() == 17  # 7 + 10
    assert torch.equal(out.loss, -out.token_logprobs.mean())
    assert out.logits is None and out.hidden_states.shape == (2, 12, m.config.hidden_size)
    with_logits = m(ids, labels=labels, position_ids=positions, return_logits=True)
    ref = torch.log_softmax(with_logits.logits[:, :-1].double(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    torch.testing.assert_close(with_logits.token_logprobs.double(), ref[out.trained], rtol=0, atol=1e-4)
