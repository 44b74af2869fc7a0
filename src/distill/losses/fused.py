"""The fused and chunked forms: KD + CE in one pass, and losses over hidden states in vocabulary chunks
so the (tokens, vocab) logits never exist at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.losses.divergences import (
    _LOG_TINY,
    _V_SLICE,
    TeacherInput,
    Tensor,
    TopKTeacher,
    _log1mexp,
    _off_ids,
    _sample_weights,
    as_teacher,
)


def _kd_ce_block(
    z: Tensor, y: Tensor, labels: Tensor, alpha: Tensor, inv_tau: Tensor, inv_n: Tensor, same_tau: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward KL at temperature tau plus token cross-entropy on one block of rows, and the
    gradient of ``alpha * KD + (1 - alpha) * CE`` with respect to the student logits.

    ``z`` student logits ``(C, V)``, ``y`` teacher logits ``(C, V)``, ``labels`` ``(C,)``; the scalars
    are 0-d tensors so one compiled graph serves every value. Returns ``(kd_sum, ce_sum, grad)``,
    sums already divided by the token count, ``grad`` in ``z``'s dtype. Closed forms:
    KD_row = tau^2 (sum p (y - z) / tau - lse(y / tau) + lse(z / tau)), dKD/dz = tau (q_tau - p),
    CE_row = lse(z) - z_label, dCE/dz = q_1 - onehot(label).
    """
    zf, yf = z.float(), y.float()
    zs, ys = zf * inv_tau, yf * inv_tau
    lse_zs = torch.logsumexp(zs, -1, keepdim=True)
    lse_ys = torch.logsumexp(ys, -1, keepdim=True)
    p = torch.exp(ys - lse_ys)
    q_tau = torch.exp(zs - lse_zs)
    tau = 1.0 / inv_tau
    cross = torch.where(torch.isneginf(ys), 0.0, p * (ys - zs)).sum(-1)  # 0 log 0 = 0; NaN shows
    kd = (cross - lse_ys.squeeze(-1) + lse_zs.squeeze(-1)).sum() * (tau * tau) * inv_n
    if same_tau:
        lse_z, q1 = lse_zs, q_tau
    else:
        lse_z = torch.logsumexp(zf, -1, keepdim=True)
        q1 = torch.exp(zf - lse_z)
    ce = (lse_z.squeeze(-1) - zf.gather(1, labels[:, None]).squeeze(1)).sum() * inv_n
    grad = (alpha * tau * (q_tau - p) + (1 - alpha) * q1) * inv_n
    grad = grad.scatter_add(1, labels[:, None], (-(1 - alpha) * inv_n).expand(labels.shape[0], 1))
    return kd, ce, grad.to(z.dtype)


def _topk_bucket_ce_block(
    z: Tensor, ids: Tensor, lp: Tensor, tail_lp: Tensor, labels: Tensor, alpha: Tensor, inv_n: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward KL against a top-k teacher with a tail bucket (temperature 1), plus token
    cross-entropy, on one block of rows, and the gradient of ``alpha * KD + (1 - alpha) * CE``.

    ``ids``/``lp`` ``(C, k)``: distinct teacher ids and log-probs, ``-inf`` marking padding;
    ``tail_lp`` ``(C,)``: log of the teacher's mass outside them. With q the student softmax,
    S its mass outside the ids, T the teacher's and W = sum p + T, the closed-form gradient is
    ``q_v * W - p_v`` on the ids and ``q_v * W - T * q_v / S`` elsewhere, where ``q_v / S`` is the
    softmax of the logits with the ids masked out: computed so, it stays exact and bounded when S is
    far below fp32's resolution of 1 - sum q_k (``_log_mass_outside``).
    """
    zf = z.float()
    lse = torch.logsumexp(zf, -1, keepdim=True)
    q = torch.exp(zf - lse)
    present = ~torch.isneginf(lp)
    p = torch.where(present, torch.exp(lp), 0.0)
    log_s_k = torch.gather(zf, 1, ids) - lse  # from the logits, not q: q is then never stored
    outside = _off_ids(zf, ids, present)  # (C, V): the logits off the teacher's ids
    # floored as in _log_mass_outside: ids covering the whole vocabulary leave no mass (then q_off = 0)
    lse_out = torch.maximum(torch.logsumexp(outside, -1, keepdim=True), lse + _LOG_TINY)
    log_s_mass = (lse_out - lse).squeeze(-1)  # log S, exact however small
    t_mass = torch.exp(tail_lp)
    kd_k = torch.where(p > 0, p * (lp - log_s_k), 0.0).sum(-1)
    kd_tail = torch.where(t_mass > 0, t_mass * (tail_lp - log_s_mass), 0.0)
    kd = (kd_k + kd_tail).sum() * inv_n
    ce = (lse.squeeze(-1) - zf.gather(1, labels[:, None]).squeeze(1)).sum() * inv_n
    w = p.sum(-1) + t_mass
    q_off = torch.exp(outside - lse_out)  # q_v / S off the ids, 0 on them
    grad = (alpha * w[:, None] + (1 - alpha)) * q - (alpha * t_mass)[:, None] * q_off
    on_ids = torch.where(present, -alpha * p, 0.0)
    where = torch.cat([ids, labels[:, None]], 1)  # one scatter: each is a pass over the block
    grad = grad.scatter_add(1, where, torch.cat([on_ids, (-(1 - alpha)).expand(labels.shape[0], 1)], 1))
    return kd, ce, (grad * inv_n).to(z.dtype)


def _topk_sample_ce_block(
    z: Tensor,
    ids: Tensor,
    lp: Tensor,
    s_ids: Tensor,
    s_lp: Tensor,
    w: Tensor,
    labels: Tensor,
    alpha: Tensor,
    inv_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward KL against a top-k teacher whose tail is represented by samples (temperature 1),
    plus token cross-entropy, on one block of rows, and the gradient of ``alpha * KD + (1 - alpha) * CE``.

    ``ids``/``lp`` ``(C, k)``: teacher ids and log-probs (-inf: padding); ``s_ids``/``s_lp``/``w``
    ``(C, m)``: tail samples, their log-probs and weights (0: no sample). With r the sparse target
    (p on the ids, w on the samples) and W its sum, the gradient is ``W q - r``.
    """
    zf = z.float()
    lse = torch.logsumexp(zf, -1, keepdim=True)
    q = torch.exp(zf - lse)
    p = torch.where(torch.isneginf(lp), 0.0, torch.exp(lp))
    kd_k = torch.where(p > 0, p * (lp - (torch.gather(zf, 1, ids) - lse)), 0.0).sum(-1)
    kd_s = torch.where(w > 0, w * (s_lp - (torch.gather(zf, 1, s_ids) - lse)), 0.0).sum(-1)
    kd = (kd_k + kd_s).sum() * inv_n
    ce = (lse.squeeze(-1) - zf.gather(1, labels[:, None]).squeeze(1)).sum() * inv_n
    big_w = p.sum(-1) + w.sum(-1)
    grad = (alpha * big_w[:, None] + (1 - alpha)) * q
    # one scatter for the three sparse terms: each out-of-place scatter is a pass over the block
    where = torch.cat([ids, s_ids, labels[:, None]], 1)
    what = torch.cat([-alpha * p, -alpha * w, (-(1 - alpha)).expand(labels.shape[0], 1)], 1)
    grad = grad.scatter_add(1, where, what)
    return kd, ce, (grad * inv_n).to(z.dtype)


def topk_sample_ce_block(
    z: Tensor, teacher: TopKTeacher, labels: Tensor, *, alpha: float, num_tokens: float, compile: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``_topk_sample_ce_block`` for rows of a sampled-tail ``TopKTeacher``, fused by torch.compile."""
    args = (z, teacher.ids.long(), teacher.logprobs.float(), teacher.sample_ids.long(),
            teacher.sample_logprobs.float(), _sample_weights(teacher), labels,
            torch.tensor(float(alpha)), torch.tensor(1.0 / float(num_tokens)))  # fmt: skip
    return _run_compiled("sample", _topk_sample_ce_block, args, compile)


def topk_bucket_ce_block(
    z: Tensor, teacher: TopKTeacher, labels: Tensor, *, alpha: float, num_tokens: float, compile: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``_topk_bucket_ce_block`` for rows of a bucket-tail ``TopKTeacher``, fused by torch.compile."""
    lp = teacher.logprobs.float()
    if teacher.tail_logprob is not None:
        tail = teacher.tail_logprob.float()
    else:
        tail = _log1mexp(torch.logsumexp(lp, -1).clamp_max(0))
    args = (z, teacher.ids.long(), lp, tail, labels, torch.tensor(float(alpha)),
            torch.tensor(1.0 / float(num_tokens)))  # fmt: skip
    return _run_compiled("topk", _topk_bucket_ce_block, args, compile)


def kd_ce_block(z: Tensor, y: Tensor, labels: Tensor, *, alpha: float, temperature: float,
                num_tokens: float, compile: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``_kd_ce_block``, fused by ``torch.compile`` into a few passes over the block (about 7x
    faster than the eager ops on a CPU; the eager form is the fallback where compiling fails)."""
    args = (z, y, labels, torch.tensor(float(alpha)), torch.tensor(1.0 / temperature),
            torch.tensor(1.0 / float(num_tokens)), temperature == 1.0)  # fmt: skip
    return _run_compiled("dense", _kd_ce_block, args, compile)


_COMPILED: dict[str, Callable] = {}


# What a failed *compilation* raises (no C++ compiler, an unsupported op or backend). Anything else,
# an out-of-memory error above all, is a real failure of the step and propagates.
_COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    torch._inductor.exc.InductorError,
)


def _run_compiled(name: str, fn: Callable, args: tuple, compile: bool):
    """``fn(*args)`` through ``torch.compile`` (one dynamic-shape graph, compiled on first use);
    if compiling fails (no C++ compiler, an unsupported backend), warn once and run it eagerly."""
    if compile and name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    if compile and _COMPILED[name] is not None:
        try:
            return _COMPILED[name](*args)
        except _COMPILE_ERRORS as exc:
            if isinstance(exc.__cause__, torch.OutOfMemoryError | MemoryError):
                raise exc.__cause__ from exc  # out of memory while compiling is still out of memory
            import warnings

            msg = f"torch.compile of the fused {name} loss failed ({exc!r:.200}); that loss runs eagerly"
            warnings.warn(msg, stacklevel=2)
            _COMPILED[name] = None
    return fn(*args)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its LM head's output before it is a logit: ``cap * tanh(scale * x / cap)``
    with soft-capping (Gemma 2 / 3: ``final_logit_softcapping``), else ``scale * x`` (Granite divides
    by ``logits_scaling``, Cohere multiplies by ``logit_scale``). The identity for most models."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitTransform:
        """The transform a transformers model config declares."""
        scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere
        scale /= float(getattr(config, "logits_scaling", None) or 1.0)  # Granite
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
        return cls(scale, float(cap) if cap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits of head output ``x`` ``(C, V)``, and their derivative in ``x`` (None: identity)."""
        if self.identity:
            return x, None
        if self.softcap is None:
            return x * self.scale, torch.full((), self.scale, dtype=x.dtype, device=x.device)
        th = torch.tanh(x.float() * (self.scale / self.softcap))
        return (th * self.softcap).to(x.dtype), ((1 - th * th) * self.scale).to(x.dtype)


class _ChunkedLoss(torch.autograd.Function):
    """Loss and its gradients computed chunk by chunk in forward; backward only rescales.

    Peak extra memory is one ``(chunk, V)`` block of logits (and its gradient), never
    ``(N, V)``. The gradient work happens once, in forward, as in Liger-Kernel's fused
    linear losses; nothing is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn, teacher, rows, chunk_size, num_tokens, kwargs, transform):
        grad_h = torch.zeros_like(hidden, dtype=torch.float32)
        need_w = ctx.needs_input_grad[1]  # a frozen head (train.freeze_embeddings): no weight gradient
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w, b = weight.detach(), None if bias is None else bias.detach()
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # cast the head once, not once per block: a detached
            low = torch.get_autocast_dtype(device)  # tensor is outside autocast's cast cache
            w, b = w.to(low), None if b is None else b.to(low)
        fast = getattr(loss_fn, "value_and_grad", None)  # a closed form, when the loss has one
        for start in range(0, rows.shape[0], chunk_size):
            idx = rows[start : start + chunk_size]  # counted positions of this block
            h = hidden[idx].detach()  # (C, H)
            t = teacher[idx] if isinstance(teacher, Tensor) else teacher.take(idx)
            logits = F.linear(h, w, b)  # (C, V)
            logits, dlogits = transform.apply(logits)
            got = fast(logits, t, num_tokens) if fast is not None else None
            if got is not None:  # a closed-form loss gives its value and gradient at once
                part, g = got
            else:
                logits.requires_grad_(True)  # a leaf: the matmul is not taped
                with torch.enable_grad():
                    part = loss_fn(logits, t, None, num_tokens=num_tokens, **kwargs)
                    (g,) = torch.autograd.grad(part, [logits])  # (C, V), in the logits' dtype
            if dlogits is not None:  # back through the model's logit transform: d(out)/d(head output)
                g = (g * dlogits).to(g.dtype)
            # d/dh = g W, d/dW += g^T h, d/db += sum g; matmuls in the input dtype as in the plain
            # form's backward, accumulated in fp32 (in place where the dtypes allow).
            grad_h[idx] = (g @ w).float()
            if grad_w is not None and g.dtype == torch.float32:
                grad_w.addmm_(g.T, h)
            elif grad_w is not None:  # low precision: a (V, H) product in slices, no full-size temporary
                for v0 in range(0, g.shape[1], _V_SLICE):
                    grad_w[v0 : v0 + _V_SLICE] += g[:, v0 : v0 + _V_SLICE].T @ h
            if grad_b is not None:
                grad_b += g.float().sum(0)
            total += part.detach()
        # Kept on ctx, not save_for_backward: backward hands these buffers over and drops its own
        # reference, so autograd can take them as .grad without cloning a (V, H) tensor.
        ctx.grads = [grad_h, grad_w] + ([grad_b] if grad_b is not None else [])
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The usual grad_out is 1 (the loss is the graph's root): hand the buffers back as they
        # are instead of allocating scaled copies of the (V, H) weight gradient.
        scale = None if float(grad_out) == 1.0 else grad_out
        saved, ctx.grads = ctx.grads, None
        grads = [g if scale is None or g is None else g * scale for g in saved]
        gh, gw, *gb = (None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=False))
        return gh, gw, (gb[0] if gb else None), None, None, None, None, None, None, None


def chunked_divergence(
    loss_fn: Callable[..., Tensor],
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: TeacherInput,
    mask: Tensor | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    transform: LogitTransform | None = None,
    **kwargs,
) -> Tensor:
    """``loss_fn`` of student logits ``hidden @ lm_head_weight.T`` without materialising them.

    Args:
        loss_fn: any divergence of this module (``forward_kl``, ``generalized_jsd``, ...).
        hidden: student final hidden states ``(B, T, H)`` or ``(N, H)``, already shifted.
        lm_head_weight: ``(V, H)``; ``lm_head_bias`` ``(V,)`` if the head has one.
        teacher_logits: dense ``(B, T, V')`` / ``(N, V')`` logits, a sparse top-k teacher, or
            any target object with ``flat()`` and ``take(rows)`` that ``loss_fn`` understands.
        mask: ``(B, T)`` / ``(N,)`` bool, True where the position counts.
        chunk_size: positions per block; peak memory grows with ``chunk_size * V`` (about a
            dozen fp32 copies of a block live at once). Default: about 2**24 logits a block
            (64 positions at V = 262,144, 341 at V = 49,152), still enough rows that the
            matmuls stay compute-bound.
        num_tokens: global count of counted positions (default: the local count).
        transform: what the model does to the head's output (``LogitTransform.of(model.config)``:
            soft-capping, a logit scale); the default is none.
        **kwargs: the loss's own options (temperature, beta, alpha, vocab_size).

    ``loss_fn`` may carry ``value_and_grad(logits, target_rows, num_tokens)`` returning the
    block's ``(loss, dloss/dlogits)`` in closed form, or None to use autograd for that block.

    Returns:
        The same scalar as ``loss_fn(hidden @ W.T, teacher, mask, ...)``, with the same
        gradients with respect to ``hidden``, ``lm_head_weight`` and ``lm_head_bias``.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H), a view
    if isinstance(teacher_logits, Tensor):
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (N, V'), a view: rows picked per block
    else:  # TopKTeacher, an (ids, logprobs) tuple, or any target with flat() / take(rows)
        t = as_teacher(teacher_logits).flat()
    if mask is None:
        rows = torch.arange(flat_h.shape[0], device=flat_h.device)
    else:
        rows = mask.reshape(-1).nonzero().squeeze(-1)  # (M,) counted positions
    count = rows.shape[0] if num_tokens is None else num_tokens
    chunk_size = chunk_size or max(1, (1 << 24) // lm_head_weight.shape[0])
    return _ChunkedLoss.apply(
        flat_h,
        lm_head_weight,
        lm_head_bias,
        loss_fn,
        t,
        rows,
        chunk_size,
        count,
        kwargs,
        transform or LogitTransform(),
    )
