"""Training samples from the teacher's answers: the ones the filter keeps, in the student's tokens."""

from __future__ import annotations

from distill.core.config import RunConfig
from distill.core.data import (
    Prompt,
    make_example,
    prompt_token_ids,
)
from distill.teacher.filters import filter_answers


def resample_from(cfg: RunConfig) -> int | None:
    """The first sample index a run draws by rejection sampling, or None when it draws none."""
    return 1 + cfg.generate.extra_samples if cfg.generate.resample else None


def kept_examples(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> tuple[list, dict]:
    """((ids, answer mask), answer record) for every answer the filter keeps, and its report."""
    pairs, report = filter_answers(prompts, answers, cfg.filter, resample_from(cfg))
    out = []
    for p, rec in pairs:
        if rec["token_ids"]:
            ids = prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                   max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            out.append((make_example(ids, rec["token_ids"], cfg.train.max_seq_len), rec))
    return out, report


def kept_text_examples(
    cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]
) -> tuple[list, dict]:
    """``kept_examples`` for a student with its own tokenizer: the teacher's answers read as text, in the
    student's tokens (and its EOS where the teacher stopped); ((ids, mask), record, prompt)."""
    from distill.core.data import student_answer_ids

    pairs, report = filter_answers(prompts, answers, cfg.filter, resample_from(cfg))
    out = []
    for p, rec in pairs:
        answer = student_answer_ids(tok, rec["text"], rec.get("finish_reason") == "stop")
        if answer:
            ids = prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                   max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            out.append((make_example(ids, answer, cfg.train.max_seq_len), rec, p))
    return out, report


def training_examples(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> list:
    """(ids, answer mask) pairs for every teacher answer that passes ``cfg.filter``."""
    return [ex for ex, _ in kept_examples(cfg, tok, prompts, answers)[0]]
