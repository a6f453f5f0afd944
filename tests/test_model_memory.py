"""Training-time memory paths: chunked labeled-only logits, layer checkpointing, no T x T scores."""

import torch

import model


def _model(path):
    return model.from_pretrained(path, dtype=torch.float32, experts="mxfp4")


def test_loss_computes_logits_only_for_labeled_rows_in_chunks(tiny_hf):
    m = _model(tiny_hf)
    v = m.config.vocab_size
    ids = torch.randint(0, v, (2, 30), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :20] = -100  # 2 x 10 labeled tokens -> 2 x 10 targets (first label of a row is never a target)
    rows, saved = [], []
    real_linear = torch.nn.functional.linear

    def linear(x, w, b=None):  # records the rows of every V-wide matmul
        if w.shape[0] == v:
            rows.append(x.shape[0])
        return real_linear(x, w, b)

    def pack(x):
        if x.ndim and x.shape[-1] == v and x is not m.lm_head.weight and x is not m.model.embed_tokens.weight:
            saved.append(tuple(x.shape))
        return x

    m.logits_chunk_size = 8
    torch.nn.functional.linear = linear
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = m(ids, labels=labels)
        out.loss.backward()
    finally:
        torch.nn.functional.linear = real_linear
    assert out.logits is None and out.n_tokens == 20
    assert rows == [8, 8, 4]  # never [B*T, V], and nothing recomputed in backward
    assert saved == []  # no V-wide tensor is kept for backward
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    full = m(ids).logits  # the plain formula from full logits, with its own gradients
    want = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1))
    want.backward()
    assert abs(out.loss.item() - want.item()) < 1e-5 * want.item()
    for n, g in grads.items():
        # fp32 sums in another order: agree to ~1e-5 of each tensor's scale
        torch.testing.assert_close(g, m.get_parameter(n).grad, rtol=1e-4, atol=2e-5 * g.abs().max().item())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf):
    ids = torch.randint(0, 201088, (1, 20), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        m = _model(tiny_hf)
        if ckpt:
            m.gradient_checkpointing_enable()
        out = m(ids, labels=ids, return_aux_loss=True)
        (out.loss + 0.01 * out.aux_loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_fused_attention_keeps_no_score_matrix(tiny_hf):
    """With attn_implementation="sdpa" nothing of size heads x T x T is saved for backward."""
    m = _model(tiny_hf)
    cfg = m.config
    t = 64
    ids = torch.randint(0, 201088, (1, t))
    for impl, expect_scores in (("eager", True), ("sdpa", False)):
        m.attn_implementation = impl
        scores = []

        def pack(x):  # [.., heads, T, T(+1)] is a score/probability matrix; the [B, 1, T, T] mask is not
            if x.ndim >= 3 and x.shape[-3] == cfg.num_attention_heads and x.shape[-2] == t and x.shape[-1] >= t:
                scores.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            m(ids, labels=ids)
        assert bool(scores) == expect_scores, scores
