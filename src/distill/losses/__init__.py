"""Divergences between teacher and student distributions: every formula once, in fp32 log space.

Pure functions of tensors, used by training (the loss) and by evaluation (the KL it reports), so
they sit below both.

Public names, by module:

    divergences: forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, skew_reverse_kl,
        total_variation, token_cross_entropy, hidden_alignment, TopKTeacher, TeacherInput, as_teacher,
        LOSSES
    fused: kd_ce_block, topk_bucket_ce_block, topk_sample_ce_block, chunked_divergence, LogitTransform
    cross: span_kl, chunk_kl, uld_loss
"""

from distill.losses.cross import chunk_kl, span_kl, uld_loss
from distill.losses.divergences import (
    LOSSES,
    TeacherInput,
    TopKTeacher,
    as_teacher,
    forward_kl,
    generalized_jsd,
    hidden_alignment,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    total_variation,
)
from distill.losses.fused import (
    LogitTransform,
    chunked_divergence,
    kd_ce_block,
    topk_bucket_ce_block,
    topk_sample_ce_block,
)

__all__ = [
    "LOSSES",
    "LogitTransform",
    "TeacherInput",
    "TopKTeacher",
    "as_teacher",
    "chunk_kl",
    "chunked_divergence",
    "forward_kl",
    "generalized_jsd",
    "hidden_alignment",
    "kd_ce_block",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "span_kl",
    "token_cross_entropy",
    "topk_bucket_ce_block",
    "topk_sample_ce_block",
    "total_variation",
    "uld_loss",
]
