"""Which teacher answers are trained on: finish reason, length, duplicates, and verification
against the prompt's reference or its labels (the rejection-sampling step of reasoning distillation)."""

from __future__ import annotations

import re
from collections import Counter

from distill.core.config import FilterConfig
from distill.core.data import Prompt
from distill.evaluate.metrics import last_number_matches, named_choices


def rejection(answer: dict, prompt: Prompt, cfg: FilterConfig, seen: set[str]) -> str | None:
    """Why ``answer`` is dropped (a short reason), or None to keep it."""
    text = answer["text"]
    if cfg.finish_reasons is not None and answer["finish_reason"] not in cfg.finish_reasons:
        return f"finish_reason_{answer['finish_reason']}"
    if len(text.strip()) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.dedupe:
        norm = " ".join(text.split())
        if norm in seen:
            return "duplicate"
        seen.add(norm)
    choices = prompt.meta.get("choices")
    if cfg.verify_choices and choices:  # a labelling prompt: its labels verify it, not ``verify``
        named = named_choices(text, choices)
        if len(named) != 1:
            return "no_single_choice"
        if prompt.reference is not None and named != {prompt.reference.strip().lower()}:
            return "wrong_choice"
    elif cfg.verify != "none" and prompt.reference is not None:
        ok = (
            last_number_matches(text, prompt.reference)
            if cfg.verify == "number"
            else re.search(prompt.reference, text) is not None
        )
        if not ok:
            return "wrong_answer"
    return None


def filter_answers(
    prompts: list[Prompt], answers: dict[str, dict], cfg: FilterConfig, resample_from: int | None = None
) -> tuple[list[tuple[Prompt, dict]], dict]:
    """(prompt, answer) pairs that pass, in prompt order then sample order, and a report:
    kept, dropped by reason, and how many kept answers had no reference to verify.

    ``resample_from``: the first sample index drawn by rejection sampling (``1 +
    generate.extra_samples``). Such an answer counts only for a prompt none of whose earlier answers
    passed, and a prompt keeps the first of them that passes, as ``generate.resample`` drew them."""
    by_prompt: dict[str, list[dict]] = {}
    for rec in answers.values():
        by_prompt.setdefault(rec["id"], []).append(rec)
    kept, dropped, unverified, resampled = [], Counter(), 0, 0
    for p in prompts:
        seen: set[str] = set()
        passed = False
        for rec in sorted(by_prompt.get(p.id, []), key=lambda r: r.get("sample", 0)):
            late = resample_from is not None and rec.get("sample", 0) >= resample_from
            if late and passed:
                break
            why = rejection(rec, p, cfg, seen)
            if why:
                dropped[why] += 1
                continue
            kept.append((p, rec))
            passed = True
            resampled += late
            unverified += cfg.verify != "none" and p.reference is None
    report = {"kept": len(kept), "dropped": sum(dropped.values()), "dropped_by_reason": dict(dropped)}
    if cfg.verify != "none":
        report["kept_without_reference"] = unverified
    if resample_from is not None:
        report["kept_by_resampling"] = resampled
    return kept, report


def prompts_to_resample(
    prompts: list[Prompt], answers: dict[str, dict], cfg: FilterConfig, resample_from: int
) -> list[Prompt]:
    """The prompts none of whose answers in ``answers`` passes ``cfg``: the next round of rejection
    sampling draws one more answer for each."""
    kept, _ = filter_answers(prompts, answers, cfg, resample_from)
    passed = {p.id for p, _ in kept}
    return [p for p in prompts if p.id not in passed]
