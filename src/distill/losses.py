"""Divergences between teacher and student next-token distributions.

Every formula lives here once. Conventions shared by all functions:

* ``student_logits`` and ``teacher_logits`` are ``(B, T, V)`` or ``(N, V)``, any float
  dtype; the math runs in fp32 log space. The caller has already shifted logits
  and labels so that position ``t`` predicts token ``t + 1``.
* ``mask`` is ``(B, T)`` or ``(N,)`` bool, True where the position counts; None counts all.
* ``temperature`` divides both sides' logits and the result is multiplied by
  ``temperature ** 2`` (Hinton et al., 2015), so the gradient scale does not depend
  on it. It is the *distillation* temperature, not the teacher's generation temperature.
* Reduction: the vocab-summed divergence is summed over counted positions and
  divided by ``num_tokens`` when given (the global count of counted positions over
  gradient-accumulation steps and processes), else by the local count. With every
  position masked the result is 0 with zero gradient.
* ``vocab_size``: when the two sides have different widths because one pads its
  LM head (e.g. 152,064 vs 151,936), pass the tokenizer's length to drop the
  extra columns; a mismatch without it raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _flatten_counted(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, vocab_size: int | None
) -> tuple[Tensor, Tensor]:
    """Counted rows of both sides as ``(M, V)`` tensors, vocab widths aligned."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in leading (position) dims"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is not None:
        if vocab_size > min(vs, vt):
            raise ValueError(f"vocab_size={vocab_size} exceeds a side's width ({vs}, {vt})")
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    elif vs != vt:
        raise ValueError(
            f"student has {vs} vocab columns and teacher {vt}: if one side pads its LM head, pass "
            "vocab_size=len(tokenizer) to drop the padding; otherwise the tokenizers differ"
        )
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != logits positions {tuple(student_logits.shape[:-1])}"
            )
        keep = mask.reshape(-1).to(torch.bool)
        s, t = s[keep], t[keep]
    return s, t


def _reduce(per_position: Tensor, num_tokens: int | float | Tensor | None) -> Tensor:
    total = per_position.sum()
    denom = per_position.shape[0] if num_tokens is None else num_tokens
    if isinstance(denom, Tensor):
        return total / denom.clamp_min(1)
    return total / max(float(denom), 1.0)


def _kl_rows(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(P || Q) per row from log-probabilities ``(M, V)`` -> ``(M,)``; 0 log 0 = 0.

    Only exact zeros of P (log-prob -inf) are skipped, so a NaN still shows; the
    difference is zeroed *before* the product so no 0 * inf reaches the backward pass.
    """
    diff = torch.where(p_logp == float("-inf"), 0.0, p_logp - q_logp)
    return (p_logp.exp() * diff).sum(-1)


def _log_mix(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """log(w * A + (1 - w) * B) computed in log space."""
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


def _divergence(
    rows: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    num_tokens: int | float | Tensor | None,
    vocab_size: int | None,
) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = _flatten_counted(student_logits, teacher_logits, mask, vocab_size)
    s_logp = F.log_softmax(s.float() / temperature, dim=-1)  # (M, V)
    t_logp = F.log_softmax(t.float() / temperature, dim=-1)  # (M, V)
    return _reduce(rows(s_logp, t_logp), num_tokens) * temperature**2


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """KL(P_T || P_S): mean-seeking; the standard distillation loss. Returns a scalar."""
    return _divergence(
        lambda s, t: _kl_rows(t, s), student_logits, teacher_logits, mask, temperature,
        num_tokens, vocab_size,
    )  # fmt: skip


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """KL(P_S || P_T): mode-seeking (MiniLLM). Returns a scalar."""
    return _divergence(
        lambda s, t: _kl_rows(s, t), student_logits, teacher_logits, mask, temperature,
        num_tokens, vocab_size,
    )  # fmt: skip


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """beta * KL(P_T || M) + (1 - beta) * KL(P_S || M), M = beta * P_T + (1 - beta) * P_S.

    Defined for 0 < beta < 1 (GKD, Agarwal et al.). Both ends make the mixture one of
    the two sides and the divergence 0; they are *not* forward / reverse KL.
    """
    if not 0 < beta < 1:
        raise ValueError(
            f"generalized_jsd needs 0 < beta < 1, got {beta}; at the ends the divergence is "
            "identically 0. Use forward_kl or reverse_kl for the plain KL objectives."
        )

    def rows(s: Tensor, t: Tensor) -> Tensor:
        m = _log_mix(t, s, beta)
        return beta * _kl_rows(t, m) + (1 - beta) * _kl_rows(s, m)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, num_tokens, vocab_size)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """KL(P_T || alpha * P_T + (1 - alpha) * P_S) (DistiLLM), 0 <= alpha < 1."""
    if not 0 <= alpha < 1:
        raise ValueError(f"skew_forward_kl needs 0 <= alpha < 1, got {alpha}")
    return _divergence(
        lambda s, t: _kl_rows(t, _log_mix(t, s, alpha)) if alpha > 0 else _kl_rows(t, s),
        student_logits, teacher_logits, mask, temperature, num_tokens, vocab_size,
    )  # fmt: skip


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """KL(P_S || alpha * P_S + (1 - alpha) * P_T) (DistiLLM), 0 <= alpha < 1."""
    if not 0 <= alpha < 1:
        raise ValueError(f"skew_reverse_kl needs 0 <= alpha < 1, got {alpha}")
    return _divergence(
        lambda s, t: _kl_rows(s, _log_mix(s, t, alpha)) if alpha > 0 else _kl_rows(s, t),
        student_logits, teacher_logits, mask, temperature, num_tokens, vocab_size,
    )  # fmt: skip


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """0.5 * sum_v |P_T - P_S|. Returns a scalar."""
    return _divergence(
        lambda s, t: 0.5 * (t.exp() - s.exp()).abs().sum(-1), student_logits, teacher_logits,
        mask, temperature, num_tokens, vocab_size,
    )  # fmt: skip


def token_cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of ``labels`` ``(B, T)`` / ``(N,)`` under the student, same reduction."""
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    flat = labels.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        logits, flat = logits[keep], flat[keep]
    per = F.cross_entropy(logits.float(), flat, reduction="none")
    return _reduce(per, num_tokens)


# Names for configs (train.loss). Each takes (student, teacher, mask, *, temperature, num_tokens).
LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}
