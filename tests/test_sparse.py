"""Tests for compress.distill.sparse: the tail bucket, the (k + 1)-bin divergences against the full ones
(equal at k = V, never above, the forward-KL gap in closed form), and the fused sparse loss against the naive one."""
import pytest
import torch

from compress.distill.losses import DIVERGENCES, fused_distill_loss, token_divergence
from compress.distill.sparse import (
    TopKTargets,
    coarse_log_probs,
    fused_sparse_distill_loss,
    naive_sparse_distill_loss,
    sparse_token_divergence,
    tail_log_mass,
    topk_targets,
    topk_targets_from_hidden,
)

BETA, ALPHA = 0.3, 0.2
N, H, V = 29, 12, 40


def logits_pair(n=N, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("k", [1, 5, V - 1, V])
def test_tail_is_the_mass_outside_the_top_k(k):
    _, t = logits_pair()
    targets = topk_targets(t, k)
    p = torch.softmax(t.double(), -1)
    top = p.gather(1, targets.indices)
    assert (top[:, :-1] >= top[:, 1:]).all(), "top-k not in descending order"
    torch.testing.assert_close(targets.logprobs.double().exp(), top, rtol=1e-5, atol=1e-7)
    rest = 1 - top.sum(-1)
    if k == V:
        assert (targets.tail == torch.finfo(torch.float32).min).all()
    else:
        torch.testing.assert_close(targets.tail.double().exp(), rest, rtol=1e-4, atol=1e-8)
    bins = torch.cat([targets.logprobs, targets.tail[:, None]], -1).double().exp().sum(-1)
    torch.testing.assert_close(bins, torch.ones(N, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_tiny_tail_is_accurate_where_one_minus_sum_cancels():
    # A teacher with 1 - 1e-9 of its mass on the top token: 1 - sum in fp32 is 0 (log -inf) or noise.
    t = torch.full((3, V), -30.0)
    t[:, 0] = 0.0
    targets = topk_targets(t, 1)
    want = torch.log_softmax(t.double(), -1)[:, 1:].logsumexp(-1)
    naive = torch.log1p(-targets.logprobs.exp().sum(-1))
    assert not torch.allclose(naive.double(), want, rtol=1e-2)
    torch.testing.assert_close(targets.tail.double(), want, rtol=1e-5, atol=1e-5)


def test_coarse_student_bins_sum_to_one_and_gather_the_top_k():
    s, t = logits_pair()
    idx = topk_targets(t, 7).indices
    log_s = torch.log_softmax(s, -1)
    bins = coarse_log_probs(log_s, idx)
    assert bins.shape == (N, 8)
    torch.testing.assert_close(bins[:, :7], log_s.gather(1, idx))
    torch.testing.assert_close(bins.exp().sum(-1), torch.ones(N), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tail_log_mass(log_s, idx).exp(), 1 - log_s.gather(1, idx).exp().sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_k_equal_to_vocab_is_the_full_divergence(kind, temperature):
    s, t = logits_pair()
    got = sparse_token_divergence(s, topk_targets(t, V, temperature=temperature), kind, temperature=temperature, beta=BETA, alpha=ALPHA)
    want = token_divergence(s, t, kind, temperature=temperature, beta=BETA, alpha=ALPHA)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_never_exceeds_full_and_grows_with_k(kind):
    s, t = logits_pair(n=50, scale=2.0)
    full = token_divergence(s, t, kind, beta=BETA, alpha=ALPHA)
    values = [sparse_token_divergence(s, topk_targets(t, k), kind, beta=BETA, alpha=ALPHA) for k in (1, 2, 4, 8, 16, 32, V)]
    for small, large in zip(values, values[1:]):
        assert (small <= large + 1e-5).all()  # the (k+1)-bin partition refines the k-bin one
    assert (values[0] < full - 1e-3).any() and (values[-1] - full).abs().max() < 1e-5
    assert (values[0] >= -1e-6).all()


def test_forward_kl_gap_is_teacher_tail_mass_times_tail_kl():
    s, t = logits_pair(scale=2.0)
    k = 6
    targets = topk_targets(t, k)
    gap = token_divergence(s, t, "forward_kl") - sparse_token_divergence(s, targets, "forward_kl")
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(1, targets.indices, False)
    p_tail = torch.where(tail, p, 0).sum(-1, keepdim=True)
    q_tail = torch.where(tail, q, 0).sum(-1, keepdim=True)
    within = torch.where(tail, (p / p_tail) * ((p / p_tail).log() - (q / q_tail).log()), 0).sum(-1)
    torch.testing.assert_close(gap.double(), p_tail.squeeze(1) * within, rtol=1e-4, atol=1e-6)
    assert (gap > 1e-4).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_divergence_of_teacher_with_itself_is_zero(kind):
    _, t = logits_pair()
    got = sparse_token_divergence(t.clone(), topk_targets(t, 5), kind, beta=BETA, alpha=ALPHA)
    torch.testing.assert_close(got, torch.zeros(N), rtol=0, atol=1e-6)


def make_sparse_problem(k=6, seed=0, bias=True, masked=(0, 4, 17)):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(N, H, generator=g)
    sw = torch.randn(V, H, generator=g) * 0.5
    sb = torch.randn(V, generator=g) * 0.1 if bias else None
    teacher = torch.randn(N, V, generator=g) * 2.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(masked)] = -100
    return sh, sw, sb, teacher, labels


def grads_of(fn, sh, sw, sb):
    leaves = [None if x is None else x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    res = fn(*leaves)
    (2.0 * res.loss).backward()
    return res, [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_sparse_equals_naive_sparse(kind, ce_weight, temperature):
    sh, sw, sb, teacher, labels = make_sparse_problem(bias=ce_weight != 1.0)
    targets = topk_targets(teacher, 6, temperature=temperature)
    kw = dict(kind=kind, temperature=temperature, beta=BETA, alpha=ALPHA, ce_weight=ce_weight)
    logits = lambda h, w, b: h @ w.T + (0 if b is None else b)  # noqa: E731
    want, want_grads = grads_of(lambda h, w, b: naive_sparse_distill_loss(logits(h, w, b), targets, labels, **kw), sh, sw, sb)
    got, got_grads = grads_of(lambda h, w, b: fused_sparse_distill_loss(h, w, b, targets, labels, chunk_size=5, **kw), sh, sw, sb)
    assert got.tokens == want.tokens == N - 3
    for a, b in [(got.loss, want.loss), (got.divergence, want.divergence), (got.ce, want.ce)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got_grads[0][labels != -100].abs().sum(-1).min() > 0
    assert (got_grads[0][labels == -100] == 0).all()


@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_fused_sparse_at_full_k_equals_fused_dense(ce_weight):
    sh, sw, sb, _, labels = make_sparse_problem()
    g = torch.Generator().manual_seed(5)
    th, tw = torch.randn(N, 9, generator=g), torch.randn(V, 9, generator=g)
    targets = topk_targets_from_hidden(th, tw, None, V, chunk_size=4)
    dense, dense_grads = grads_of(lambda h, w, b: fused_distill_loss(h, w, b, th, tw, None, labels, ce_weight=ce_weight, chunk_size=5), sh, sw, sb)
    sparse, sparse_grads = grads_of(lambda h, w, b: fused_sparse_distill_loss(h, w, b, targets, labels, ce_weight=ce_weight, chunk_size=5), sh, sw, sb)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_closed_form_gradient_is_student_minus_refined_teacher():
    # d KL_sparse / d logits = p_S - r, r = p_T on the top-k, p_T(tail) * p_S / p_S(tail) on the tail.
    sh, sw, _, teacher, _ = make_sparse_problem()
    labels = torch.zeros(N, dtype=torch.long)
    targets = topk_targets(teacher, 4)
    z = (sh @ sw.T).requires_grad_(True)
    fused = fused_sparse_distill_loss(sh, sw, None, targets, labels, chunk_size=7)
    naive_sparse_distill_loss(z, targets, labels).loss.backward()
    q = torch.softmax(z.detach().double(), -1)
    tail = torch.ones_like(q, dtype=torch.bool).scatter(1, targets.indices, False)
    r = q * targets.tail.double().exp()[:, None] / torch.where(tail, q, 0).sum(-1, keepdim=True)
    r = r.scatter(1, targets.indices, targets.logprobs.double().exp())
    torch.testing.assert_close(z.grad.double(), (q - r) / N, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused.loss, naive_sparse_distill_loss(z.detach(), targets, labels).loss, rtol=1e-5, atol=1e-7)


def test_targets_from_hidden_equal_targets_from_logits():
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    a = topk_targets_from_hidden(h, w, b, 5, temperature=2.0, chunk_size=4)
    ref = topk_targets(h @ w.T + b, 5, temperature=2.0)
    assert torch.equal(a.indices, ref.indices)
    torch.testing.assert_close(a.logprobs, ref.logprobs)
    torch.testing.assert_close(a.tail, ref.tail)


@pytest.mark.parametrize("bad, pattern", [
    (lambda t: TopKTargets(t.logprobs, t.indices[:, :2], t.tail), "one shape"),
    (lambda t: TopKTargets(t.logprobs[:3], t.indices[:3], t.tail[:3]), "N = 29 rows"),
])
def test_bad_targets_are_refused(bad, pattern):
    sh, sw, sb, teacher, labels = make_sparse_problem()
    with pytest.raises(ValueError, match=pattern):
        fused_sparse_distill_loss(sh, sw, sb, bad(topk_targets(teacher, 4)), labels)


def test_top_k_larger_than_vocab_is_refused():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 40\]"):
        topk_targets(torch.zeros(2, V), V + 1)
