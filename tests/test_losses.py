"""distill.losses against a plain float64 reference written here: values and gradients."""

from __future__ import annotations

import pytest
import torch

from distill import losses as L
from distill.losses import fused

SHAPE = (3, 47, 123)  # odd on purpose


# --- independent reference: probabilities in float64, formulas as written in papers -----------


def ref_probs(logits, temperature):
    return torch.softmax(logits.double() / temperature, -1)


def ref_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def ref_rows(name, p, q, beta=0.5, alpha=0.1):
    """p: teacher probs, q: student probs, (N, V) float64 -> per-position divergence (N,)."""
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_forward_kl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


def ref_loss(name, s, t, mask, temperature=1.0, **kw):
    p, q = ref_probs(t, temperature), ref_probs(s, temperature)
    per = ref_rows(name, p, q, **kw)  # (B, T)
    m = mask.double()
    return (per * m).sum() / m.sum().clamp_min(1) * temperature**2


def call(name, s, t, mask, **kw):
    return L.LOSSES[name](s, t, mask, **kw)


def data(dtype=torch.float32, seed=0, shape=SHAPE, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    return s, t, mask


NAMES = list(L.LOSSES)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}


def _kwargs(name, beta=0.5, alpha=0.1):
    return {"beta": beta} if name == "jsd" else {"alpha": alpha} if name.startswith("skew") else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_value_and_gradient_match_reference(name, temperature, dtype):
    s, t, mask = data(dtype)
    kw = _kwargs(name)
    got = call(name, s, t, mask, temperature=temperature, **kw)
    assert got.dtype == torch.float32
    (g_got,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_(True)
    want = ref_loss(name, s64, t, mask, temperature, **kw)
    (g_want,) = torch.autograd.grad(want, s64)
    # Values: both sides see the same (possibly bf16-rounded) logits; the math is fp32.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.double(), g_want, **{k: v for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("coef", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("name", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixture_coefficients(name, coef):
    s, t, mask = data(seed=1)
    kw = {"beta": coef} if name == "jsd" else {"alpha": coef}
    got = call(name, s, t, mask, **kw)
    want = ref_loss(name, s.detach(), t, mask, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_jsd_ends_are_refused_with_the_right_names():
    s, t, mask = data()
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="forward_kl or reverse_kl"):
            L.generalized_jsd(s, t, mask, beta=beta)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_is_zero_with_zero_gradient(name):
    s, t, _ = data()
    mask = torch.zeros(SHAPE[:-1], dtype=torch.bool)
    got = call(name, s, t, mask, **_kwargs(name))
    got.backward()
    assert got.item() == 0.0 and torch.count_nonzero(s.grad) == 0 and not s.grad.isnan().any()


def test_empty_input_is_zero():
    s = torch.zeros((0, 11), requires_grad=True)
    assert L.forward_kl(s, torch.zeros((0, 11))).item() == 0.0


def test_global_token_count_makes_split_batches_add_up():
    s, t, mask = data(seed=2)
    whole = L.forward_kl(s, t, mask)
    n = int(mask.sum())
    halves = L.forward_kl(s[:1], t[:1], mask[:1], num_tokens=n) + L.forward_kl(
        s[1:], t[1:], mask[1:], num_tokens=n
    )
    torch.testing.assert_close(halves, whole)


def test_no_mask_counts_every_position():
    s, t, _ = data(seed=3)
    full = torch.ones(SHAPE[:-1], dtype=torch.bool)
    torch.testing.assert_close(L.reverse_kl(s, t), L.reverse_kl(s, t, full))
    flat = L.reverse_kl(s.reshape(-1, SHAPE[-1]), t.reshape(-1, SHAPE[-1]))
    torch.testing.assert_close(flat, L.reverse_kl(s, t))


def test_identical_distributions_give_zero():
    s, _, mask = data()
    for name in NAMES:
        assert abs(call(name, s, s.detach(), mask, **_kwargs(name)).item()) < 1e-6, name


def test_nan_teacher_is_not_hidden():
    s, t, mask = data()
    t[0, 0, 0] = float("nan")
    mask[0, 0] = True
    assert torch.isnan(L.forward_kl(s, t, mask))


def test_padded_vocab_is_dropped_only_when_asked():
    s, t, mask = data()
    padded = torch.cat([s.detach(), torch.full((*SHAPE[:-1], 5), 9.0)], -1)  # 5 junk columns
    with pytest.raises(ValueError, match="vocab_size=len\\(tokenizer\\)"):
        L.forward_kl(padded, t, mask)
    torch.testing.assert_close(L.forward_kl(padded, t, mask, vocab_size=SHAPE[-1]), L.forward_kl(s, t, mask))
    with pytest.raises(ValueError, match="exceeds"):
        L.forward_kl(padded, t, mask, vocab_size=SHAPE[-1] + 1)


def test_shape_errors_are_explained():
    s, t, mask = data()
    with pytest.raises(ValueError, match="leading"):
        L.forward_kl(s, t[:, :5], None)
    with pytest.raises(ValueError, match="mask shape"):
        L.forward_kl(s, t, mask[:, :5])


# --- sparse (top-k) teacher -----------------------------------------------------------------


def topk(t, k, tail="renormalize"):
    lp = torch.log_softmax(t.float(), -1)
    vals, ids = lp.topk(k, -1)
    return L.TopKTeacher(ids, vals, tail)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("name", NAMES)
def test_sparse_with_k_equal_v_equals_dense(name, tail):
    s, t, mask = data(seed=4)
    kw = _kwargs(name)
    dense = call(name, s, t, mask, **kw)
    (g_dense,) = torch.autograd.grad(dense, s)
    sparse = call(name, s, topk(t, SHAPE[-1], tail), mask, **kw)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sparse_renormalized_matches_reference(temperature):
    s, t, mask = data(seed=5)
    k = 8
    tk = topk(t, k)
    got = L.forward_kl(s, tk, mask, temperature=temperature)
    # reference: both distributions restricted to the teacher's top-k ids and renormalised
    ids = tk.ids
    p = torch.softmax(torch.gather(t.double(), -1, ids) / temperature, -1)
    q = torch.softmax(torch.gather(s.detach().double(), -1, ids) / temperature, -1)
    want = (ref_kl(p, q) * mask).sum() / mask.sum() * temperature**2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sparse_bucket_matches_reference_and_needs_temperature_one():
    s, t, mask = data(seed=6)
    tk = topk(t, 8, "bucket")
    got = L.reverse_kl(s, tk, mask)
    pt, ps = torch.softmax(t.double(), -1), torch.softmax(s.detach().double(), -1)
    pk, qk = torch.gather(pt, -1, tk.ids), torch.gather(ps, -1, tk.ids)
    p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    want = (ref_kl(q, p) * mask).sum() / mask.sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="temperature=1"):
        L.reverse_kl(s, tk, mask, temperature=2.0)


def test_sparse_accepts_a_tuple_and_checks_ids():
    s, t, mask = data()
    tk = topk(t, 5)
    torch.testing.assert_close(L.forward_kl(s, (tk.ids, tk.logprobs), mask), L.forward_kl(s, tk, mask))
    with pytest.raises(ValueError, match=">= student vocab"):
        L.forward_kl(s, L.TopKTeacher(tk.ids + SHAPE[-1], tk.logprobs), mask)


# --- chunked over hidden states ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "total_variation"])
def test_chunked_equals_plain(name, sparse, dtype):
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 31, 16, 123
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.25
    t_in = topk(teacher, 10) if sparse else teacher
    kw = {**_kwargs(name), "temperature": 2.0}
    plain = L.LOSSES[name](hidden @ weight.T, t_in, mask, **kw)
    gh_p, gw_p = torch.autograd.grad(plain, [hidden, weight])
    chunked = L.chunked_divergence(L.LOSSES[name], hidden, weight, t_in, mask, chunk_size=7, **kw)
    gh_c, gw_c = torch.autograd.grad(chunked, [hidden, weight])
    tol = TOL[dtype]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh_c.float(), gh_p.float(), **tol)
    torch.testing.assert_close(gw_c.float(), gw_p.float(), **tol)


def test_chunked_with_bias_and_global_count():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(20, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    teacher = torch.randn(20, 11, generator=g)
    plain = L.forward_kl(hidden @ weight.T + bias, teacher, num_tokens=50)
    grads_p = torch.autograd.grad(plain, [hidden, weight, bias])
    chunked = L.chunked_divergence(
        L.forward_kl, hidden, weight, teacher, lm_head_bias=bias, chunk_size=3, num_tokens=50
    )
    torch.testing.assert_close(chunked, plain)
    # Scaled afterwards (as in alpha * KD): the incoming gradient is not 1.
    grads_c = torch.autograd.grad(0.3 * chunked, [hidden, weight, bias])
    for a, b in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(a, 0.3 * b)


def test_chunked_with_a_frozen_head_gives_the_hidden_gradient_only():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 13, 8, generator=g, requires_grad=True)
    weight = torch.randn(29, 8, generator=g)  # frozen: no gradient asked for
    teacher = torch.randn(2, 13, 29, generator=g)
    plain = L.forward_kl(hidden @ weight.T, teacher)
    (gh_p,) = torch.autograd.grad(0.7 * plain, [hidden])
    chunked = L.chunked_divergence(L.forward_kl, hidden, weight, teacher, chunk_size=5)
    (gh_c,) = torch.autograd.grad(0.7 * chunked, [hidden])
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(gh_c, gh_p)
    chunked = L.chunked_divergence(L.forward_kl, hidden, weight, teacher, chunk_size=5)
    chunked.backward()
    assert weight.grad is None and hidden.grad is not None


def test_chunked_all_masked():
    hidden = torch.randn(4, 5, 6, requires_grad=True)
    weight = torch.randn(9, 6, requires_grad=True)
    out = L.chunked_divergence(
        L.forward_kl, hidden, weight, torch.randn(4, 5, 9), torch.zeros(4, 5, dtype=torch.bool)
    )
    out.backward()
    assert out.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


# --- golden values: a fixed seed, recorded once; any change of semantics shows here ----------

GOLDEN = {
    "forward_kl": 2.8467945,
    "reverse_kl": 3.2959074,
    "jsd": 0.63308186,
    "skew_forward_kl": 2.0747574,
    "skew_reverse_kl": 2.1629306,
    "total_variation": 1.7768917,
}


@pytest.mark.parametrize("name", NAMES)
def test_golden_values(name):
    s, t, mask = data(seed=0, shape=(2, 5, 7), scale=2.0)
    got = call(name, s, t, mask, temperature=2.0, **_kwargs(name)).detach()
    assert got.item() == pytest.approx(GOLDEN[name], rel=1e-5)


def test_cross_entropy_matches_reference():
    s, _, mask = data(seed=9)
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1])
    got = L.token_cross_entropy(s, labels, mask)
    lp = torch.log_softmax(s.detach().double(), -1)
    want = -(torch.gather(lp, -1, labels[..., None])[..., 0] * mask).sum() / mask.sum()
    torch.testing.assert_close(got.double(), want)


def test_sparse_bucket_uses_the_recorded_tail_mass():
    s, t, mask = data(seed=10)
    tk = topk(t, 8, "bucket")
    tail = torch.log1p(-tk.logprobs.double().exp().sum(-1)).float()  # (B, T)
    with_tail = L.TopKTeacher(tk.ids, tk.logprobs, "bucket", tail)
    torch.testing.assert_close(L.forward_kl(s, with_tail, mask), L.forward_kl(s, tk, mask))
    wrong = L.TopKTeacher(tk.ids, tk.logprobs, "bucket", tail - 1.0)
    assert not torch.isclose(L.forward_kl(s, wrong, mask), L.forward_kl(s, tk, mask))
    # chunked picks the recorded tail per block too
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(*SHAPE[:-1], 16, generator=g, requires_grad=True)
    weight = torch.randn(SHAPE[-1], 16, generator=g)
    plain = L.forward_kl(hidden @ weight.T, with_tail, mask)
    chunked = L.chunked_divergence(L.forward_kl, hidden, weight, with_tail, mask, chunk_size=5)
    torch.testing.assert_close(chunked, plain)


# -- the fused forward-KL + CE block (closed form, torch.compile) ------------------------------------


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kd_ce_block_matches_autograd_in_float64(compile, temperature, alpha, dtype):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(37, 101, generator=g) * 3).to(dtype)
    y = torch.randn(37, 101, generator=g) * 3
    y[0, :5] = float("-inf")  # a teacher that rules tokens out: 0 log 0 = 0
    y = y.to(dtype)
    labels = torch.randint(0, 101, (37,), generator=g)
    n = 50.0
    kd, ce, grad = L.kd_ce_block(
        z, y, labels, alpha=alpha, temperature=temperature, num_tokens=n, compile=compile
    )
    z64 = z.double().requires_grad_(True)
    ref_kd = L.forward_kl(z64, y.double(), temperature=temperature, num_tokens=n)
    ref_ce = L.token_cross_entropy(z64, labels, num_tokens=n)
    (alpha * ref_kd + (1 - alpha) * ref_ce).backward()
    assert float(kd) == pytest.approx(float(ref_kd.detach()), rel=1e-5, abs=1e-7)
    assert float(ce) == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    assert grad.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(grad.double(), z64.grad, **tol)


def test_fused_kd_ce_block_lets_a_nan_teacher_show():
    z, y = torch.randn(4, 9), torch.randn(4, 9)
    y[1, 2] = float("nan")
    kd, _, _ = L.kd_ce_block(z, y, torch.zeros(4, dtype=torch.long), alpha=0.5, temperature=1.0, num_tokens=4)
    assert torch.isnan(kd)


def _topk_rows(g, rows, vocab, k, pad):
    """A top-k teacher of ``rows`` positions; the last ``pad`` entries of each row are padding."""
    full = torch.log_softmax(torch.randn(rows, vocab, generator=g) * 2, -1)
    lp, ids = full.topk(k, -1)
    lp[:, k - pad :] = float("-inf")
    return ids, lp


def _matches_float64_autograd(got, z, teacher, labels, alpha, num_tokens):
    """A fused block's (kd, ce, grad) against forward KL + CE and their autograd gradient in float64."""
    kd, ce, grad = got
    z64 = z.double().requires_grad_(True)
    ref_kd = L.forward_kl(z64, teacher, num_tokens=num_tokens)
    ref_ce = L.token_cross_entropy(z64, labels, num_tokens=num_tokens)
    (alpha * ref_kd + (1 - alpha) * ref_ce).backward()
    assert float(kd) == pytest.approx(float(ref_kd.detach()), rel=1e-5)
    assert float(ce) == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    tol = dict(rtol=1e-4, atol=1e-7) if z.dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(grad.double(), z64.grad, **tol)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("recorded_tail", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_topk_bucket_block_matches_autograd_in_float64(compile, recorded_tail, dtype):
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(29, 97, generator=g) * 3).to(dtype)
    ids, lp = _topk_rows(g, 29, 97, 8, pad=2)
    tail = torch.log1p(-lp.exp().sum(-1)) - 0.01 if recorded_tail else None
    teacher = L.TopKTeacher(ids, lp, "bucket", tail)
    labels = torch.randint(0, 97, (29,), generator=g)
    got = L.topk_bucket_ce_block(z, teacher, labels, alpha=0.4, num_tokens=40.0, compile=compile)
    _matches_float64_autograd(got, z, teacher, labels, 0.4, 40.0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_padded_topk_entries_are_no_outcome(tail):
    """A row padded with -inf entries (fewer than k ids) gives what the unpadded row gives."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(7, 50, generator=g)
    ids, lp = _topk_rows(g, 7, 50, 6, pad=0)
    padded_ids = torch.cat([ids, torch.zeros(7, 3, dtype=ids.dtype)], -1)  # id 0 may also be a real id
    padded_lp = torch.cat([lp, torch.full((7, 3), float("-inf"))], -1)
    for loss in (L.forward_kl, L.reverse_kl):
        a = loss(s, L.TopKTeacher(ids, lp, tail))
        b = loss(s, L.TopKTeacher(padded_ids, padded_lp, tail))
        torch.testing.assert_close(a, b)


# --- sparse teacher with a sampled tail -----------------------------------------------------------


def sampled(t, k, m, seed=0):
    """Top-k of dense teacher logits ``(N, V)`` plus ``m`` tail samples per row (the cache's sampler)."""
    from distill.teacher.cache import _tail_samples

    lp = torch.log_softmax(t.double(), -1)
    vals, ids = lp.topk(k, -1)
    s_ids, s_lp = _tail_samples(lp, ids, m, f"{seed:015x}" + "0" * 9)  # a key: 24 hex digits
    tail = torch.log1p(-vals.exp().sum(-1))
    return L.TopKTeacher(ids, vals, "sample", tail, torch.from_numpy(s_ids), torch.from_numpy(s_lp))


def test_sampled_tail_estimates_the_dense_forward_kl_without_bias():
    """With many samples the value and gradient approach the dense forward KL's (computed here
    from the full teacher distribution), though the top-k alone is far from it."""
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(6, 40, generator=g) * 2).double().requires_grad_(True)
    t = torch.randn(6, 40, generator=g) * 1.5  # a flat teacher: much mass outside its top 4
    p, q = ref_probs(t, 1.0), torch.softmax(s, -1)
    want = ref_kl(p, q).mean()
    (want_g,) = torch.autograd.grad(want, s)
    got = L.forward_kl(s, sampled(t, 4, 200_000))
    (got_g,) = torch.autograd.grad(got, s)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=0.02)
    torch.testing.assert_close(got_g, want_g, rtol=0, atol=0.01 * float(want_g.abs().max()))
    # the bucket with the same k misses the tail's shape: its gradient is visibly biased
    head = sampled(t, 4, 1)
    bucket = L.forward_kl(s, L.TopKTeacher(head.ids, head.logprobs, "bucket", head.tail_logprob))
    (bucket_g,) = torch.autograd.grad(bucket, s)
    assert float((bucket_g - want_g).abs().max()) > 10 * float((got_g - want_g).abs().max())


def test_sampled_tail_draws_come_from_outside_the_top_k_and_repeat():
    g = torch.Generator().manual_seed(12)
    t = torch.randn(5, 30, generator=g)
    a, b = sampled(t, 6, 50, seed=3), sampled(t, 6, 50, seed=3)
    assert torch.equal(a.sample_ids, b.sample_ids)  # seeded by the sample's key
    assert not torch.equal(a.sample_ids, sampled(t, 6, 50, seed=4).sample_ids)
    assert not (a.sample_ids[:, :, None] == a.ids[:, None, :]).any()
    lp = torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(a.sample_logprobs, lp.gather(-1, a.sample_ids))
    # a teacher with no mass outside its top-k has no samples: -inf, and the KL is the top-k's
    one_hot = torch.full((2, 30), -1e4)
    one_hot[:, 0] = 0.0
    none = sampled(one_hot, 3, 4)
    assert torch.isneginf(none.sample_logprobs).all()
    s = torch.randn(2, 30, generator=g)
    want = -torch.log_softmax(s.double(), -1)[:, 0].mean()
    assert float(L.forward_kl(s, none)) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_topk_sample_block_matches_autograd_in_float64(compile, dtype):
    g = torch.Generator().manual_seed(13)
    z = (torch.randn(29, 97, generator=g) * 2).to(dtype)
    teacher = sampled(torch.randn(29, 97, generator=g) * 2, 8, 5)
    pad = teacher.sample_logprobs.clone()
    pad[:4, 3:] = float("-inf")  # rows with fewer samples: the tail mass is shared by the rest
    lp = teacher.logprobs.float().clone()
    lp[:3, 6:] = float("-inf")  # padded top-k entries
    tail = teacher.tail_logprob.float()
    teacher = L.TopKTeacher(teacher.ids, lp, "sample", tail, teacher.sample_ids, pad.float())
    labels = torch.randint(0, 97, (29,), generator=g)
    got = L.topk_sample_ce_block(z, teacher, labels, alpha=0.3, num_tokens=35.0, compile=compile)
    _matches_float64_autograd(got, z, teacher, labels, 0.3, 35.0)


def test_sampled_tail_is_forward_kl_at_temperature_one_only():
    t = torch.randn(4, 20)
    tk = sampled(t, 3, 2)
    with pytest.raises(ValueError, match="forward KL only"):
        L.reverse_kl(torch.randn(4, 20), tk)
    with pytest.raises(ValueError, match="temperature=1"):
        L.forward_kl(torch.randn(4, 20), tk, temperature=2.0)
    with pytest.raises(ValueError, match="needs sample_ids"):
        L.TopKTeacher(tk.ids, tk.logprobs, "sample", tk.tail_logprob)


def test_chunked_under_autocast_matches_plain():
    """Under bf16 autocast (how training runs) the chunked form casts the head once and still
    gives the plain form's loss and fp32 gradients."""
    g = torch.Generator().manual_seed(17)
    hidden = torch.randn(3, 31, 16, generator=g).requires_grad_(True)
    weight = (torch.randn(123, 16, generator=g) * 0.5).requires_grad_(True)
    teacher = torch.randn(3, 31, 123, generator=g) * 3
    mask = torch.rand(3, 31, generator=g) > 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = L.forward_kl(torch.nn.functional.linear(hidden, weight), teacher, mask)
        gh_p, gw_p = torch.autograd.grad(plain, [hidden, weight])
        chunked = L.chunked_divergence(L.forward_kl, hidden, weight, teacher, mask, chunk_size=7)
        gh_c, gw_c = torch.autograd.grad(chunked, [hidden, weight])
    assert gw_c.dtype == torch.float32 and gh_c.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh_c, gh_p, **TOL[torch.bfloat16])
    torch.testing.assert_close(gw_c, gw_p, **TOL[torch.bfloat16])


# --- review defects ----------------------------------------------------------------------------


def _bucket_kl_float64(z: torch.Tensor, ids, lp, tail_lp, labels, alpha, num_tokens):
    """alpha * bucket forward KL + (1 - alpha) * CE written out in float64: the student's tail mass
    is the sum of its probabilities off the ids (exact in float64 at any size)."""
    logq = torch.log_softmax(z.double(), -1)
    on = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, ids, True)
    log_s = torch.logsumexp(logq.masked_fill(on, float("-inf")), -1)
    p = lp.double().exp()
    kd = (p * (lp.double() - logq.gather(1, ids))).sum(-1) + tail_lp.double().exp() * (
        tail_lp.double() - log_s
    )
    ce = -logq.gather(1, labels[:, None]).squeeze(1)
    return (alpha * kd.sum() + (1 - alpha) * ce.sum()) / num_tokens, kd.sum() / num_tokens


@pytest.mark.parametrize("compile", [False, True])
def test_bucket_gradient_stays_exact_for_a_confident_student(compile):
    """Defect 1: with the student's mass outside the teacher's top-k below fp32's resolution of
    1 - sum(q_k) (here ~1e-11), the fused bucket gradient divided by a floored 0 and blew up."""
    g = torch.Generator().manual_seed(11)
    n, v, k = 13, 89, 6
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    z = torch.randn(n, v, generator=g) * 2
    z.scatter_add_(1, ids, torch.full((n, k), 28.0))  # the k ids hold all but ~e^-28 of the mass
    p = torch.softmax(torch.randn(n, k, generator=g), -1) * 0.95  # the teacher keeps 5% in its tail
    lp, tail = p.log(), torch.full((n,), 0.05).log()
    labels = ids[:, 0]
    teacher = L.TopKTeacher(ids, lp, "bucket", tail)
    z64 = z.double().requires_grad_(True)
    ref, ref_kd = _bucket_kl_float64(z64, ids, lp, tail, labels, 0.5, 20.0)
    ref.backward()
    kd, _, grad = L.topk_bucket_ce_block(z, teacher, labels, alpha=0.5, num_tokens=20.0, compile=compile)
    assert float(kd) == pytest.approx(float(ref_kd), rel=1e-4)
    torch.testing.assert_close(grad.double(), z64.grad, rtol=1e-4, atol=1e-7)
    assert float(grad.abs().max()) < 1.0  # the exact gradient is small; it used to reach ~1e26
    # the autograd (non-fused) bucket path agrees too
    zf = z.clone().requires_grad_(True)
    (
        0.5 * L.forward_kl(zf, teacher, num_tokens=20.0)
        + 0.5 * L.token_cross_entropy(zf, labels, num_tokens=20.0)
    ).backward()
    torch.testing.assert_close(zf.grad.double(), z64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("scoring_t", "distill_t"), [(2.0, 2.0), (1.0, 2.0), (0.5, 1.0)])
def test_cached_logprobs_are_rescaled_not_divided_again(scoring_t, distill_t):
    """Defect 7: log-probs scored at the cache's temperature were divided by the distillation
    temperature once more. The reference renormalises teacher logits / distill_t over the k ids."""
    g = torch.Generator().manual_seed(12)
    y, z = torch.randn(9, 40, generator=g) * 3, torch.randn(9, 40, generator=g) * 3
    vals, ids = torch.log_softmax(y / scoring_t, -1).topk(7, -1)
    got = L.forward_kl(z, L.TopKTeacher(ids, vals, temperature=scoring_t), temperature=distill_t)
    p = torch.softmax(y.gather(1, ids).double() / distill_t, -1)
    q = torch.softmax(z.gather(1, ids).double() / distill_t, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * distill_t**2
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_bucket_and_samples_need_logprobs_scored_at_temperature_one():
    ids, lp = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scored at temperature 1"):
        L.TopKTeacher(ids, lp, "bucket", temperature=2.0)


@pytest.mark.parametrize(("scale", "cap"), [(1.0, 30.0), (0.25, None), (2.5, 7.0)])
def test_chunked_loss_applies_the_models_logit_transform(scale, cap):
    """Defect 2: the chunked loss rebuilt logits as hidden @ W.T and skipped soft-capping and
    logit scales. Reference: the transform written out on the full logits, plain autograd."""
    g = torch.Generator().manual_seed(13)
    h = torch.randn(2, 11, 16, generator=g, requires_grad=True)
    w = (torch.randn(53, 16, generator=g) * 2).requires_grad_(True)
    t = torch.randn(2, 11, 53, generator=g) * 3
    mask = torch.rand(2, 11, generator=g) > 0.3
    raw = h @ w.T * scale
    logits = cap * torch.tanh(raw / cap) if cap else raw
    want = L.forward_kl(logits, t, mask)
    gw_want, gh_want = torch.autograd.grad(want, [w, h])
    got = L.chunked_divergence(L.forward_kl, h, w, t, mask, chunk_size=5,
                               transform=L.LogitTransform(scale, cap))  # fmt: skip
    gw, gh = torch.autograd.grad(got, [w, h])
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(gw, gw_want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh, gh_want, rtol=1e-4, atol=1e-6)


def test_logit_transforms_are_read_from_the_model_configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert L.LogitTransform.of(Gemma2Config(final_logit_softcapping=30.0)) == L.LogitTransform(1.0, 30.0)
    assert L.LogitTransform.of(GraniteConfig(logits_scaling=8.0)) == L.LogitTransform(0.125, None)
    assert L.LogitTransform.of(CohereConfig(logit_scale=0.0625)) == L.LogitTransform(0.0625, None)
    assert L.LogitTransform.of(LlamaConfig()).identity


def test_compile_fallback_is_for_compile_errors_only(monkeypatch):
    """Defect 10: any exception, an out-of-memory error included, switched the loss to eager."""

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CPU out of memory")

    def no_compiler(*_):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

    monkeypatch.setitem(fused._COMPILED, "test_oom", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fused._run_compiled("test_oom", lambda x: x + 1, (1,), True)
    assert fused._COMPILED["test_oom"] is out_of_memory  # still compiled: nothing was switched off
    monkeypatch.setitem(fused._COMPILED, "test_cc", no_compiler)
    with pytest.warns(UserWarning, match="runs eagerly"):
        assert fused._run_compiled("test_cc", lambda x: x + 1, (1,), True) == 2
    assert fused._COMPILED["test_cc"] is None
