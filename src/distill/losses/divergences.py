"""Divergences between teacher and student next-token distributions.

Every formula lives once in this package (the fused and chunked forms in ``fused``, the ones
across tokenizers in ``cross``). Conventions shared by all functions:

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
* Sparse teacher: instead of dense logits, ``teacher_logits`` may be a ``TopKTeacher``
  (or an ``(ids, logprobs)`` tuple): the teacher's top-k token ids ``(..., k)`` and their
  log-probabilities ``(..., k)`` under the full vocabulary. The mass outside the k ids
  is handled one of two ways:

  - ``"renormalize"``: both distributions are restricted to the k ids and renormalised,
    and the divergence is taken over those k outcomes.
  - ``"bucket"``: the k ids plus one tail outcome holding the rest of the mass
    (1 - sum of the k probabilities) on each side; k + 1 outcomes. The tail mass is
    only known at the temperature the teacher was scored at, so this mode needs
    ``temperature == 1``.
  - ``"sample"`` (forward KL only, temperature 1): the k ids exactly, and the tail by
    m ids drawn from the teacher's distribution outside them (``sample_ids``, with their
    teacher log-probs ``sample_logprobs``), each standing for tail mass / m. The value
    and the gradient are unbiased estimates of the dense forward KL's, tail shape
    included, which the bucket cannot teach (stratified sampling, after Anshumann et
    al. 2025, "Sparse Logit Sampling").

  With k = V all modes equal the dense divergence.
* Chunked: ``chunked_divergence`` takes the student's final hidden states and the LM
  head weight and never builds the full ``(N, V)`` student logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distill.core.config import LOSS_NAMES

Tensor = torch.Tensor


_TINY = torch.finfo(torch.float32).tiny


_LOG_TINY = math.log(_TINY)


_V_SLICE = 16384  # vocab rows per slice when accumulating a low-precision LM-head gradient


@dataclass(frozen=True)
class TopKTeacher:
    """A sparse teacher signal: top-k ids ``(..., k)`` int and log-probs ``(..., k)``.

    ``logprobs`` are normalised over the full vocabulary (so they sum to at most 1);
    ``tail`` says how the mass outside the k ids is treated (module docstring).
    """

    ids: Tensor
    logprobs: Tensor
    tail: Literal["renormalize", "bucket", "sample"] = "renormalize"
    tail_logprob: Tensor | None = None  # (...,) log of the mass outside the k ids, if recorded
    sample_ids: Tensor | None = None  # (..., m) ids drawn from the teacher outside the k ("sample")
    sample_logprobs: Tensor | None = None  # (..., m) their teacher log-probs; -inf: no sample
    temperature: float = 1.0  # the softmax temperature the log-probs were scored at (a cache's)

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(f"top-k ids {tuple(self.ids.shape)} != logprobs {tuple(self.logprobs.shape)}")
        if self.tail not in ("renormalize", "bucket", "sample"):
            raise ValueError(f"tail must be 'renormalize', 'bucket' or 'sample', got {self.tail!r}")
        if self.tail != "renormalize" and self.temperature != 1.0:
            raise ValueError(
                f"tail={self.tail!r} needs log-probs scored at temperature 1 (these are at "
                f"{self.temperature}); use tail='renormalize'"
            )
        if self.tail == "sample" and (
            self.sample_ids is None or self.sample_logprobs is None or self.tail_logprob is None
        ):
            raise ValueError("tail='sample' needs sample_ids, sample_logprobs and tail_logprob")

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TopKTeacher:
        def opt(x: Tensor | None) -> Tensor | None:
            return None if x is None else fn(x)

        return TopKTeacher(fn(self.ids), fn(self.logprobs), self.tail, opt(self.tail_logprob),
                           opt(self.sample_ids), opt(self.sample_logprobs), self.temperature)  # fmt: skip

    def rows(self, keep: Tensor | None) -> TopKTeacher:
        """Flattened to ``(M, k)``, keeping the positions where ``keep`` (flat bool) is True."""
        lead = self.ids.shape[:-1].numel()
        flat = self._map(lambda x: x.reshape(lead, *x.shape[self.ids.dim() - 1 :]))
        return flat if keep is None else flat.take(keep)

    def flat(self) -> TopKTeacher:
        """Flattened to ``(N, k)`` rows."""
        return self.rows(None)

    def take(self, rows: Tensor) -> TopKTeacher:
        """The flat ``(M, k)`` signal's rows ``rows`` (indices or a bool mask)."""
        return self._map(lambda x: x[rows])


TeacherInput = Tensor | TopKTeacher | tuple[Tensor, Tensor]


def as_teacher(teacher: TeacherInput) -> Tensor | TopKTeacher:
    if isinstance(teacher, tuple):
        return TopKTeacher(*teacher)
    return teacher


def _flatten_counted(
    student_logits: Tensor, teacher: Tensor | TopKTeacher, mask: Tensor | None, vocab_size: int | None
) -> tuple[Tensor, Tensor | TopKTeacher]:
    """Counted rows of both sides: ``(M, V)`` student, ``(M, V)`` or top-k ``(M, k)`` teacher."""
    t_shape = teacher.ids.shape if isinstance(teacher, TopKTeacher) else teacher.shape
    if student_logits.shape[:-1] != t_shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher {tuple(t_shape)} "
            "differ in leading (position) dims"
        )
    vs = student_logits.shape[-1]
    if isinstance(teacher, TopKTeacher):
        if vocab_size is not None:
            student_logits = student_logits[..., :vocab_size]
    else:
        vt = teacher.shape[-1]
        if vocab_size is not None:
            if vocab_size > min(vs, vt):
                raise ValueError(f"vocab_size={vocab_size} exceeds a side's width ({vs}, {vt})")
            student_logits, teacher = student_logits[..., :vocab_size], teacher[..., :vocab_size]
        elif vs != vt:
            raise ValueError(
                f"student has {vs} vocab columns and teacher {vt}: if one side pads its LM head, "
                "pass vocab_size=len(tokenizer) to drop the padding; otherwise the tokenizers differ"
            )
    keep = None
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != logits positions {tuple(student_logits.shape[:-1])}"
            )
        keep = mask.reshape(-1).to(torch.bool)
    s = student_logits.reshape(-1, student_logits.shape[-1])
    if keep is not None:
        s = s[keep]
    if isinstance(teacher, TopKTeacher):
        t = teacher.rows(keep)
        if t.ids.numel() and int(t.ids.max()) >= s.shape[-1]:
            raise ValueError(f"teacher top-k id {int(t.ids.max())} >= student vocab {s.shape[-1]}")
        return s, t
    t = teacher.reshape(-1, teacher.shape[-1])
    return s, (t[keep] if keep is not None else t)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in fp32, without a copy when there is nothing to do."""
    x = logits.float()
    return x if temperature == 1.0 else x / temperature


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, clamped away from log(0) so gradients stay finite."""
    return torch.log((-torch.expm1(x)).clamp_min(_TINY))


def _off_ids(logits: Tensor, ids: Tensor, present: Tensor) -> Tensor:
    """``logits`` ``(M, V)`` with the ``ids`` ``(M, k)`` of each row set to -inf; ``present`` ``(M, k)``
    False marks padding entries, which mask nothing.

    Padding sits after a row's ids (top-k order), so a padding entry can point at the row's first id
    instead (masking an id twice is harmless), and a row whose first entry is padding has no ids.
    """
    where = torch.where(present, ids, ids[:, :1])
    return torch.where(present[:, :1], logits.scatter(-1, where, float("-inf")), logits)


def _log_mass_outside(logits: Tensor, ids: Tensor, present: Tensor) -> Tensor:
    """log of the softmax mass outside ``ids`` per row, ``(M, V)``, ``(M, k)``, ``(M, k)`` -> ``(M,)``.

    A log-sum-exp over the logits with the ids masked out (``_off_ids``), minus the full one: exact
    however small the mass is, where ``log(1 - sum q_k)`` in fp32 rounds to log(0) once the k ids
    hold all but ~1e-7 of it (a confident student), and its gradient ``1 / (1 - sum q_k)`` blows up.
    Ids covering the whole vocabulary leave no mass: it is floored at fp32's tiniest, as log(0) is.
    """
    lse = torch.logsumexp(logits, -1)
    return (torch.logsumexp(_off_ids(logits, ids, present), -1) - lse).clamp_min(_LOG_TINY)


def _support_logprobs(s: Tensor, t: Tensor | TopKTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the same outcomes, ``(M, V)`` or ``(M, k[+1])``."""
    if not isinstance(t, TopKTeacher):
        return F.log_softmax(_scaled(s, temperature), -1), F.log_softmax(_scaled(t, temperature), -1)
    if t.tail == "sample":
        raise ValueError(
            "tail='sample' estimates the forward KL only; use tail='bucket' with this divergence"
        )
    ids, lp = t.ids.long(), t.logprobs.float()
    absent = torch.isneginf(lp)  # padding of a row with fewer than k ids: no outcome on either side
    if t.tail == "renormalize":
        s_k = torch.gather(_scaled(s, temperature), -1, ids).masked_fill(absent, float("-inf"))  # (M, k)
        # log-probs scored at temperature t.temperature are logits / t.temperature up to a constant
        # per row, which the renormalisation drops: rescale them to the distillation temperature
        # instead of dividing once more (the two temperatures must not stack)
        return F.log_softmax(s_k, -1), F.log_softmax(lp * (t.temperature / temperature), -1)
    if temperature != 1.0:
        raise ValueError(
            "tail='bucket' needs temperature=1: the teacher's tail mass is only known at the "
            "temperature it was scored at; use tail='renormalize' for other temperatures"
        )
    s_k = torch.gather(F.log_softmax(s.float(), -1), -1, ids).masked_fill(absent, float("-inf"))  # (M, k)
    s_tail = _log_mass_outside(s.float(), ids, ~absent).unsqueeze(-1)
    if t.tail_logprob is not None:  # recorded before the k log-probs were rounded
        t_tail = t.tail_logprob.float().unsqueeze(-1)
    else:
        t_tail = _log1mexp(torch.logsumexp(lp, -1, keepdim=True).clamp_max(0))
    return torch.cat([s_k, s_tail], -1), torch.cat([lp, t_tail], -1)


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
    if not torch.isneginf(p_logp).any():
        # The common case (finite logits): one fused kernel forward and backward, fewer passes
        # over the (M, V) block than the guarded form below.
        return F.kl_div(q_logp, p_logp, reduction="none", log_target=True).sum(-1)
    diff = torch.where(p_logp == float("-inf"), 0.0, p_logp - q_logp)
    return (p_logp.exp() * diff).sum(-1)


def _sample_weights(t: TopKTeacher) -> Tensor:
    """``(M, m)`` weight of each tail sample: the tail mass shared out over the row's samples."""
    there = ~torch.isneginf(t.sample_logprobs)
    per = torch.exp(t.tail_logprob.float()) / there.sum(-1).clamp_min(1)
    return torch.where(there, per[:, None], 0.0)


def _sampled_kl_rows(q_logp: Tensor, t: TopKTeacher) -> Tensor:
    """Forward KL per row ``(M,)`` with the k ids exact and the tail estimated from samples:
    sum_k p (log p - log q) + sum_j w_j (log p_j - log q_j), w_j = tail mass / m."""
    lp, s_lp = t.logprobs.float(), t.sample_logprobs.float()
    head = torch.where(torch.isneginf(lp), 0.0, lp.exp() * (lp - q_logp.gather(-1, t.ids.long())))
    w = _sample_weights(t)
    tail = torch.where(w > 0, w * (s_lp - q_logp.gather(-1, t.sample_ids.long())), 0.0)
    return head.sum(-1) + tail.sum(-1)


def _log_mix(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """log(w * A + (1 - w) * B) computed in log space."""
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


def _divergence(
    rows: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: TeacherInput,
    mask: Tensor | None,
    temperature: float,
    num_tokens: int | float | Tensor | None,
    vocab_size: int | None,
) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = _flatten_counted(student_logits, as_teacher(teacher_logits), mask, vocab_size)
    s_logp, t_logp = _support_logprobs(s, t, temperature)  # (M, V) or (M, k[+1]) each
    return _reduce(rows(s_logp, t_logp), num_tokens) * temperature**2


def forward_kl(
    student_logits: Tensor,
    teacher_logits: TeacherInput,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_tokens: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """KL(P_T || P_S): mean-seeking; the standard distillation loss. Returns a scalar."""
    t = as_teacher(teacher_logits)
    if isinstance(t, TopKTeacher) and t.tail == "sample":
        if temperature != 1.0:
            raise ValueError("tail='sample' needs temperature=1: the samples were drawn at temperature 1")
        s, t = _flatten_counted(student_logits, t, mask, vocab_size)
        return _reduce(_sampled_kl_rows(F.log_softmax(s.float(), -1), t), num_tokens)
    return _divergence(
        lambda s, t: _kl_rows(t, s), student_logits, teacher_logits, mask, temperature,
        num_tokens, vocab_size,
    )  # fmt: skip


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: TeacherInput,
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
    teacher_logits: TeacherInput,
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
    teacher_logits: TeacherInput,
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
    teacher_logits: TeacherInput,
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
    teacher_logits: TeacherInput,
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


def hidden_alignment(
    student_hidden: list[Tensor],
    teacher_hidden: list[Tensor],
    mask: Tensor | None = None,
    *,
    kind: Literal["cosine", "mse"] = "cosine",
    num_tokens: int | float | Tensor | None = None,
    projection: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Hidden-state alignment (DistilBERT, TinyBERT): student layer j against its mapped teacher layer.

    ``student_hidden[j]`` is ``(B, T, H_s)``, ``teacher_hidden[j]`` ``(B, T, H_t)``; ``mask`` ``(B, T)``.
    With widths that differ, ``projection`` (a learned ``H_s -> H_t`` map, one for all layers as in
    TinyBERT) takes each student state to the teacher's width first.
    Per counted position, ``cosine``: 1 - cos(s, t); ``mse``: mean over H of (s - t)^2; averaged
    over the layer pairs, summed over positions and divided by ``num_tokens`` (the usual reduction).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"{len(student_hidden)} student layers paired with {len(teacher_hidden)} teacher layers"
        )
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    count = None
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        s = s if projection is None else projection(s)  # (B, T, H_t)
        if s.shape != t.shape:
            raise ValueError(f"student hidden {tuple(s.shape)} and teacher {tuple(t.shape)} differ")
        sf, tf = s.float(), t.float()
        per = (
            1 - F.cosine_similarity(sf, tf, dim=-1) if kind == "cosine" else (sf - tf).pow(2).mean(-1)
        )  # (B, T)
        if mask is not None:
            per = per[mask.to(torch.bool)]
        total = total + per.sum()
        count = per.numel()
    denom = count if num_tokens is None else num_tokens
    return _reduce(total.reshape(1), denom) / len(student_hidden)


# Names for configs (train.loss). Each takes (student, teacher, mask, *, temperature, num_tokens).
LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}
if tuple(LOSSES) != LOSS_NAMES:  # the config accepts exactly the names defined here
    raise ImportError(f"distill.losses.LOSSES {tuple(LOSSES)} differs from distill.core.config.LOSS_NAMES")
