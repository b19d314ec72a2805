"""Tests for compress.distill.losses: every divergence against formulas written out here in float64,
the fused chunked loss against the naive full-logit one, masking, memory, and evaluation sums."""

import math

import pytest
import torch

from compress.distill.losses import (
    DIVERGENCES,
    AgreementSums,
    agreement_sums,
    fused_distill_loss,
    hidden_state_loss,
    naive_distill_loss,
    perplexity,
    token_divergence,
)

BETA, ALPHA = 0.3, 0.2  # away from 0.5 so a swapped mixture convention changes the numbers


def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


# Reference formulas on probabilities p = p_T (teacher), q = p_S (student).
REFERENCE = {
    "forward_kl": lambda p, q, b, a: kl(p, q),
    "reverse_kl": lambda p, q, b, a: kl(q, p),
    "jsd": lambda p, q, b, a: b * kl(p, b * p + (1 - b) * q) + (1 - b) * kl(q, b * p + (1 - b) * q),
    "skew_forward_kl": lambda p, q, b, a: kl(p, a * p + (1 - a) * q),
    "skew_reverse_kl": lambda p, q, b, a: kl(q, a * q + (1 - a) * p),
    "tvd": lambda p, q, b, a: 0.5 * (p - q).abs().sum(-1),
}


def reference_divergence(kind, student_logits, teacher_logits, temperature, beta=BETA, alpha=ALPHA):
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    return REFERENCE[kind](p, q, beta, alpha)


def random_logits(n=7, v=33, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def test_every_kind_has_a_reference():
    assert set(REFERENCE) == set(DIVERGENCES)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_matches_reference(kind, temperature):
    s, t = random_logits()
    got = token_divergence(s, t, kind, temperature=temperature, beta=BETA, alpha=ALPHA)
    want = reference_divergence(kind, s, t, temperature)
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_of_identical_distributions_is_zero(kind):
    s, _ = random_logits()
    got = token_divergence(s, s.clone(), kind, beta=BETA, alpha=ALPHA)
    torch.testing.assert_close(got, torch.zeros(7), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_is_nonnegative_and_tvd_at_most_one(kind):
    s, t = random_logits(n=50, scale=10.0)  # sharp, mostly disjoint distributions
    got = token_divergence(s, t, kind, beta=BETA, alpha=ALPHA)
    assert (got >= -1e-6).all()
    if kind == "tvd":
        assert (got <= 1 + 1e-6).all() and got.max() > 0.9


def test_jsd_ends_are_the_plain_kls():
    s, t = random_logits()
    fwd = token_divergence(s, t, "forward_kl")
    rev = token_divergence(s, t, "reverse_kl")
    assert torch.equal(token_divergence(s, t, "jsd", beta=0.0), fwd)
    assert torch.equal(token_divergence(s, t, "jsd", beta=1.0), rev)
    assert not torch.allclose(fwd, rev)


def test_skew_kl_at_alpha_zero_is_the_plain_kl():
    s, t = random_logits()
    assert torch.equal(token_divergence(s, t, "skew_forward_kl", alpha=0.0), token_divergence(s, t, "forward_kl"))
    assert torch.equal(token_divergence(s, t, "skew_reverse_kl", alpha=0.0), token_divergence(s, t, "reverse_kl"))
    skewed = token_divergence(s, t, "skew_forward_kl", alpha=0.5)
    assert not torch.allclose(skewed, token_divergence(s, t, "forward_kl"))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_extreme_logits_stay_finite(kind):
    s, t = random_logits()
    s[:, :5] = -1e4
    t[:, :5] = -1e4
    s[:, 5:8] = float("-inf")
    t[:, 5:8] = float("-inf")
    s.requires_grad_(True)
    got = token_divergence(s, t, kind, beta=BETA, alpha=ALPHA)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(s.grad).all()
    keep = slice(8, None)
    want = reference_divergence(kind, s.detach()[:, keep], t[:, keep], 1.0)
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


# ---- fused vs naive ---------------------------------------------------------------------------

N, H_S, H_T, V = 37, 12, 20, 33


def make_problem(seed=0, bias=True, n=N, masked=(0, 5, 17, 36)):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, H_S, generator=g)
    sw = torch.randn(V, H_S, generator=g) * 0.5
    sb = torch.randn(V, generator=g) * 0.1 if bias else None
    th = torch.randn(n, H_T, generator=g)
    tw = torch.randn(V, H_T, generator=g) * 0.5
    tb = torch.randn(V, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[list(masked)] = -100
    return sh, sw, sb, th, tw, tb, labels


def leaves(*tensors):
    return [None if x is None else x.clone().requires_grad_(True) for x in tensors]


def logits_of(h, w, b):
    z = h @ w.T
    return z if b is None else z + b


def run_naive(sh, sw, sb, th, tw, tb, labels, **kw):
    sh, sw, sb = leaves(sh, sw, sb)
    res = naive_distill_loss(logits_of(sh, sw, sb), logits_of(th, tw, tb), labels, **kw)
    (3.0 * res.loss).backward()
    return res, sh.grad, sw.grad, None if sb is None else sb.grad


def run_fused(sh, sw, sb, th, tw, tb, labels, **kw):
    sh, sw, sb = leaves(sh, sw, sb)
    res = fused_distill_loss(sh, sw, sb, th, tw, tb, labels, **kw)
    (3.0 * res.loss).backward()
    return res, sh.grad, sw.grad, None if sb is None else sb.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # forward_kl takes a closed-form path except with CE at T != 1
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_equals_naive(kind, ce_weight, temperature):
    problem = make_problem(bias=ce_weight == 0.0)  # with and without biases
    kw = dict(kind=kind, temperature=temperature, beta=BETA, alpha=ALPHA, ce_weight=ce_weight)
    want, *want_grads = run_naive(*problem, **kw)
    got, *got_grads = run_fused(*problem, chunk_size=8, **kw)
    assert got.tokens == want.tokens == N - 4
    for a, b in [(got.loss, want.loss), (got.divergence, want.divergence), (got.ce, want.ce)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got_grads[0].abs().sum() > 0


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["jsd", "tvd"])
def test_naive_equals_written_out_objective(kind, ce_weight):
    sh, sw, sb, th, tw, tb, labels = make_problem()
    zs, zt = logits_of(sh, sw, sb), logits_of(th, tw, tb)
    keep = labels != -100
    div = reference_divergence(kind, zs[keep], zt[keep], 2.0)
    ce = -torch.log_softmax(zs[keep].double(), -1).gather(1, labels[keep, None]).squeeze(1)
    want = (1 - ce_weight) * 4.0 * div.mean() + ce_weight * ce.mean()
    res = naive_distill_loss(zs, zt, labels, kind=kind, temperature=2.0, beta=BETA, alpha=ALPHA, ce_weight=ce_weight)
    torch.testing.assert_close(res.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.divergence.double(), div.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.ce.double(), ce.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_loss_is_t_squared_times_kl(temperature):
    sh, sw, sb, th, tw, tb, labels = make_problem()
    keep = labels != -100
    zs, zt = logits_of(sh, sw, sb)[keep], logits_of(th, tw, tb)[keep]
    kl_t = reference_divergence("forward_kl", zs, zt, temperature).mean()
    res = fused_distill_loss(sh, sw, sb, th, tw, tb, labels, temperature=temperature, chunk_size=8)
    torch.testing.assert_close(res.loss.double(), temperature**2 * kl_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.divergence.double(), kl_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_masked_tokens_contribute_nothing(fused):
    run = run_fused if fused else run_naive
    kw = dict(kind="jsd", ce_weight=0.3, **({"chunk_size": 8} if fused else {}))
    sh, sw, sb, th, tw, tb, labels = make_problem()
    masked = labels == -100
    base, gh, gw, gb = run(sh, sw, sb, th, tw, tb, labels, **kw)
    sh2, th2 = sh.clone(), th.clone()
    sh2[masked] = torch.randn(int(masked.sum()), H_S) * 100
    th2[masked] = torch.randn(int(masked.sum()), H_T) * 100
    other, gh2, gw2, gb2 = run(sh2, sw, sb, th2, tw, tb, labels, **kw)
    torch.testing.assert_close(other.loss, base.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw2, gw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb2, gb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh2[~masked], gh[~masked], rtol=1e-5, atol=1e-7)
    assert (gh[masked] == 0).all() and (gh2[masked] == 0).all()
    assert (gh[~masked].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_all_masked_is_zero_and_differentiable(fused):
    sh, sw, sb, th, tw, tb, labels = make_problem(masked=range(N))
    run = run_fused if fused else run_naive
    res, gh, gw, gb = run(sh, sw, sb, th, tw, tb, labels, kind="forward_kl", ce_weight=0.3)
    assert res.tokens == 0
    for x in (res.loss, res.divergence, res.ce):
        assert x.item() == 0.0
    for g in (gh, gw, gb):
        assert g is not None and torch.isfinite(g).all() and (g == 0).all()


def test_tied_weights_accumulate_both_uses():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N,))
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100
    _, _, _, th, tw, tb, _ = make_problem()
    grads = {}
    for name in ("naive", "fused"):
        torch.manual_seed(1)
        emb = torch.nn.Embedding(V, H_S)
        proj = torch.nn.Linear(H_S, H_S)
        h = torch.tanh(proj(emb(ids)))  # (N, H_S), depends on the same weight as the head
        if name == "naive":
            res = naive_distill_loss(h @ emb.weight.T, logits_of(th, tw, tb), labels, kind="reverse_kl", ce_weight=0.3)
        else:
            res = fused_distill_loss(
                h, emb.weight, None, th, tw, tb, labels, kind="reverse_kl", ce_weight=0.3, chunk_size=8
            )
        res.loss.backward()
        grads[name] = (emb.weight.grad.clone(), proj.weight.grad.clone())
    for a, b in zip(grads["fused"], grads["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_student_is_close_to_fp32():
    sh, sw, sb, th, tw, tb, labels = make_problem()
    ref, *ref_grads = run_fused(sh, sw, sb, th, tw, tb, labels, kind="forward_kl", chunk_size=8, ce_weight=0.3)
    low = [x.bfloat16() for x in (sh, sw, sb)]
    got, *got_grads = run_fused(*low, th, tw, tb, labels, kind="forward_kl", chunk_size=8, ce_weight=0.3)
    assert got.loss.dtype == torch.float32 and torch.isfinite(got.loss)
    torch.testing.assert_close(got.loss, ref.loss, rtol=3e-2, atol=1e-2)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=0.1, atol=3e-3)


def test_no_grad_skips_gradient_work_and_gives_same_values():
    problem = make_problem()
    sh, sw, sb = leaves(*problem[:3])
    with_grad = fused_distill_loss(sh, sw, sb, *problem[3:], kind="tvd", chunk_size=8)
    with torch.no_grad():
        without = fused_distill_loss(sh, sw, sb, *problem[3:], kind="tvd", chunk_size=8)
    assert with_grad.loss.requires_grad and not without.loss.requires_grad
    torch.testing.assert_close(without.loss, with_grad.loss.detach(), rtol=1e-6, atol=0)


def test_frozen_head_gets_no_gradient_and_hidden_grad_is_unchanged():
    problem = make_problem()
    _, want_h, _, _ = run_naive(*problem, kind="skew_reverse_kl", alpha=ALPHA)
    sh = problem[0].clone().requires_grad_(True)
    sw, sb = problem[1].clone(), problem[2].clone()  # frozen lm_head
    fused_distill_loss(sh, sw, sb, *problem[3:], kind="skew_reverse_kl", alpha=ALPHA, chunk_size=8).loss.backward()
    assert sw.grad is None and sb.grad is None
    torch.testing.assert_close(3.0 * sh.grad, want_h, rtol=1e-4, atol=1e-6)


def largest_saved_numel(fn):
    """Largest tensor autograd saves for backward while fn runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_fused_never_saves_an_n_by_v_tensor():
    n, h, v = 256, 32, 1000
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(n, h, generator=g, requires_grad=True)
    sw = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)

    def fused():
        fused_distill_loss(sh, sw, None, th, tw, None, labels, kind="jsd", ce_weight=0.3, chunk_size=16).loss.backward()

    def naive():
        naive_distill_loss(sh @ sw.T, th @ tw.T, labels, kind="jsd", ce_weight=0.3).loss.backward()

    bound = max(n * h, v * h)
    assert largest_saved_numel(fused) <= bound
    assert largest_saved_numel(naive) >= n * v  # the check does catch a full-logit path


# ---- hidden states ------------------------------------------------------------------------------


def test_hidden_state_loss_matches_masked_mse():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pairs = [(0, 0), (2, 3)]
    got = hidden_state_loss(student, teacher, pairs, mask)
    want = 0.0
    for s, t in pairs:
        positions = [(b, i) for b in range(2) for i in range(5) if mask[b, i]]
        total = sum(((student[s][b, i] - teacher[t][b, i]) ** 2).mean() for b, i in positions)
        want = want + total / int(mask.sum())
    want = want / len(pairs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    assert (student[0].grad[0, 3:] == 0).all() and (student[0].grad[0, :3] != 0).any()
    torch.testing.assert_close(hidden_state_loss(student, teacher, pairs, mask.long()), got.detach())


def test_hidden_state_size_mismatch_names_the_pair():
    student = [torch.zeros(2, 5, 8), torch.zeros(2, 5, 8)]
    teacher = [torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.zeros(2, 5, 16)]
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        hidden_state_loss(student, teacher, [(0, 0), (1, 2)], torch.ones(2, 5))


# ---- evaluation sums ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_agreement_sums_match_full_logits(bias):
    sh, sw, sb, th, _, _, labels = make_problem(bias=bias)
    g = torch.Generator().manual_seed(3)
    # A teacher close to the student, so top-1 agrees on some tokens but not all.
    tw = torch.cat([sw, torch.zeros(V, H_T - H_S)], 1) + 0.3 * torch.randn(V, H_T, generator=g)
    th = torch.cat([sh, torch.zeros(N, H_T - H_S)], 1)
    tb = None if sb is None else sb + 0.1
    got = agreement_sums(sh, sw, sb, th, tw, tb, labels, chunk_size=8)
    keep = labels != -100
    zs, zt = logits_of(sh, sw, sb)[keep].double(), logits_of(th, tw, tb)[keep].double()
    y = labels[keep]
    assert got.tokens == int(keep.sum())
    assert math.isclose(got.student_nll, -torch.log_softmax(zs, -1).gather(1, y[:, None]).sum().item(), rel_tol=1e-5)
    assert math.isclose(got.teacher_nll, -torch.log_softmax(zt, -1).gather(1, y[:, None]).sum().item(), rel_tol=1e-5)
    p, q = torch.softmax(zt, -1), torch.softmax(zs, -1)
    assert math.isclose(got.kl, kl(p, q).sum().item(), rel_tol=1e-5)
    agree = int((zs.argmax(-1) == zt.argmax(-1)).sum())
    assert got.top1_agree == agree and 0 < agree < got.tokens


def test_agreement_sums_add_up_across_batches():
    sh, sw, sb, th, tw, tb, labels = make_problem()
    whole = agreement_sums(sh, sw, sb, th, tw, tb, labels, chunk_size=8)
    parts = [
        agreement_sums(sh[i:i + 10], sw, sb, th[i:i + 10], tw, tb, labels[i:i + 10], chunk_size=4)
        for i in range(0, N, 10)
    ]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    assert sum(parts) == total
    assert total.tokens == whole.tokens and total.top1_agree == whole.top1_agree
    for f in ("student_nll", "teacher_nll", "kl"):
        assert math.isclose(getattr(total, f), getattr(whole, f), rel_tol=1e-5)
    assert AgreementSums(1, 2.0, 3.0, 4.0, 1) + AgreementSums(2, 1.0, 1.0, 1.0, 0) == AgreementSums(3, 3.0, 4.0, 5.0, 1)


def test_perplexity():
    assert math.isclose(perplexity(10.0, 4), math.exp(2.5))
    assert perplexity(1e6, 1) == float("inf")
    with pytest.raises(ValueError, match="tokens"):
        perplexity(1.0, 0)


# ---- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"kind": "kl_forward"}, r"kl_forward.*forward_kl"),
        ({"kind": "jsd", "beta": 1.5}, "beta"),
        ({"kind": "jsd", "beta": -0.1}, "beta"),
        ({"kind": "forward_kl", "temperature": 0.0}, "temperature"),
        ({"kind": "skew_forward_kl", "alpha": 1.0}, "alpha"),
    ],
)
def test_bad_arguments_raise(kw, pattern):
    s, t = random_logits()
    with pytest.raises(ValueError, match=pattern):
        token_divergence(s, t, **kw)
    sh, sw, sb, th, tw, tb, labels = make_problem()
    with pytest.raises(ValueError, match=pattern):
        fused_distill_loss(sh, sw, sb, th, tw, tb, labels, **kw)
    with pytest.raises(ValueError, match=pattern):
        naive_distill_loss(s, t, torch.zeros(7, dtype=torch.long), **kw)


def test_bad_ce_weight_raises():
    sh, sw, sb, th, tw, tb, labels = make_problem()
    with pytest.raises(ValueError, match="ce_weight"):
        fused_distill_loss(sh, sw, sb, th, tw, tb, labels, ce_weight=1.5)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_soft_capped_logits_follow_the_direct_formula(kind, ce_weight):
    # Gemma-2 caps its logits: z = c * tanh(raw / c). A cap of 2 bends these logits (|raw| up to ~6) a lot.
    sh, sw, sb, th, tw, tb, labels = make_problem()
    cap_s, cap_t = 2.0, 3.0
    keep = labels != -100
    leaf_h, leaf_w, leaf_b = leaves(sh, sw, sb)
    zs = cap_s * torch.tanh(logits_of(leaf_h, leaf_w, leaf_b) / cap_s)
    zt = cap_t * torch.tanh(logits_of(th, tw, tb) / cap_t)
    log_s, log_t = torch.log_softmax(zs[keep].double(), -1), torch.log_softmax(zt[keep].double(), -1)
    div = (log_t.exp() * (log_t - log_s)).sum(-1) if kind == "forward_kl" else (log_s.exp() * (log_s - log_t)).sum(-1)
    ce = -log_s.gather(1, labels[keep, None]).squeeze(1)
    want = (1 - ce_weight) * div.mean() + ce_weight * ce.mean()
    (3.0 * want).backward()
    got, *grads = run_fused(sh, sw, sb, th, tw, tb, labels, kind=kind, ce_weight=ce_weight, chunk_size=8, softcap=cap_s, teacher_softcap=cap_t)
    torch.testing.assert_close(got.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, (leaf_h.grad, leaf_w.grad, leaf_b.grad)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    # Without the caps the same problem gives another loss: the cap is applied, not ignored.
    plain, *_ = run_fused(sh, sw, sb, th, tw, tb, labels, kind=kind, ce_weight=ce_weight, chunk_size=8)
    assert abs(float(plain.loss.detach()) - float(want.detach())) > 0.05
    # Evaluation statistics and the sparse (top-k) loss see the same capped logits.
    from compress.distill.sparse import fused_sparse_distill_loss, topk_targets_from_hidden

    sums = agreement_sums(sh, sw, sb, th, tw, tb, labels, chunk_size=8, softcap=cap_s, teacher_softcap=cap_t)
    torch.testing.assert_close(torch.tensor(sums.kl / sums.tokens, dtype=torch.float64), (log_t.exp() * (log_t - log_s)).sum(-1).mean().detach(), rtol=1e-5, atol=1e-6)
    targets = topk_targets_from_hidden(th, tw, tb, V, softcap=cap_t)  # k = V: the sparse loss is the dense one
    sparse = fused_sparse_distill_loss(sh, sw, sb, targets, labels, kind=kind, ce_weight=ce_weight, chunk_size=8, softcap=cap_s)
    torch.testing.assert_close(sparse.loss.double(), want.detach(), rtol=1e-4, atol=1e-5)
