"""Divergences between a student and a teacher of another tokenizer, over aligned chunks of text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uld_loss(
    student_logits: Tensor, teacher_sorted: Tensor, teacher_tail: Tensor, *, num_tokens=None
) -> Tensor:
    """Universal Logit Distillation: sum over ranks of |student's i-th largest probability - the
    teacher's|, the vectors padded with zeros to one length. With the teacher's top ``k`` only, the
    ranks past k count as one: |student's mass past rank k - the teacher's tail|. Summed over rows,
    divided by ``num_tokens`` (default: the rows)."""
    p = torch.softmax(student_logits.float(), -1)
    k = teacher_sorted.shape[-1]
    s_sorted = p.sort(-1, descending=True).values
    if s_sorted.shape[-1] < k:  # a smaller student vocabulary: its missing ranks are zeros
        s_sorted = F.pad(s_sorted, (0, k - s_sorted.shape[-1]))
    head = (s_sorted[..., :k] - teacher_sorted.float()).abs().sum(-1)
    tail = (s_sorted[..., k:].sum(-1) - teacher_tail.float()).abs()
    total = (head + tail).sum()
    return total / (num_tokens if num_tokens is not None else max(student_logits.shape[0], 1))


def span_kl(student_logits: Tensor, ids: Tensor, logprobs: Tensor, *, num_tokens=None) -> Tensor:
    """Forward KL from the teacher's top-k mapped into the student's vocabulary (``ids`` -1: a teacher
    token the student lacks) to the student, the teacher's other mass as one tail bucket against the
    student's mass outside the mapped ids. Summed over rows / ``num_tokens``."""
    logq = torch.log_softmax(student_logits.float(), -1)  # (N, V_s)
    p = logprobs.float().exp() * (ids >= 0)  # mapped mass only
    safe = ids.clamp_min(0)
    # several teacher tokens may map to one student token: their mass adds up
    p_student = torch.zeros_like(logq).scatter_add_(-1, safe, p)
    present = p_student > 0
    mapped = torch.where(present, p_student * (p_student.clamp_min(1e-30).log() - logq), 0.0).sum(-1)
    p_tail = (1 - p_student.sum(-1)).clamp_min(0)
    q_in = torch.where(present, logq.exp(), 0.0).sum(-1)
    q_tail = (1 - q_in).clamp_min(1e-12)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    total = (mapped + tail).sum()
    return total / (num_tokens if num_tokens is not None else max(student_logits.shape[0], 1))


def chunk_kl(student_logp: Tensor, teacher_logp: Tensor, *, num_tokens=None) -> Tensor:
    """KL(Bernoulli(p_t) ‖ Bernoulli(p_s)) for chunks whose log-probabilities (each the sum of its
    tokens' log-probs, the chain rule) are ``teacher_logp`` and ``student_logp`` (C,)."""
    lt, ls = teacher_logp.float(), student_logp.float()
    pt = lt.exp()
    log1m = lambda x: torch.log(-torch.expm1(x.clamp_max(-1e-7)))  # noqa: E731 - log(1 - e^x), stable
    kl = pt * (lt - ls) + (1 - pt) * (log1m(lt) - log1m(ls))
    return kl.sum() / (num_tokens if num_tokens is not None else max(student_logp.shape[0], 1))
