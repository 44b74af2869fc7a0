"""Which teacher answers are trained on: finish reason, length, duplicates, and verification
against the prompt's reference (the rejection-sampling step of reasoning distillation)."""

from __future__ import annotations

import re
from collections import Counter

from distill.core.config import FilterConfig
from distill.core.data import Prompt
from distill.evaluate.metrics import last_number_matches


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
    if cfg.verify != "none" and prompt.reference is not None:
        ok = (
            last_number_matches(text, prompt.reference)
            if cfg.verify == "number"
            else re.search(prompt.reference, text) is not None
        )
        if not ok:
            return "wrong_answer"
    return None


def filter_answers(
    prompts: list[Prompt], answers: dict[str, dict], cfg: FilterConfig
) -> tuple[list[tuple[Prompt, dict]], dict]:
    """(prompt, answer) pairs that pass, in prompt order then sample order, and a report:
    kept, dropped by reason, and how many kept answers had no reference to verify."""
    by_prompt: dict[str, list[dict]] = {}
    for rec in answers.values():
        by_prompt.setdefault(rec["id"], []).append(rec)
    kept, dropped, unverified = [], Counter(), 0
    for p in prompts:
        seen: set[str] = set()
        for rec in sorted(by_prompt.get(p.id, []), key=lambda r: r.get("sample", 0)):
            why = rejection(rec, p, cfg, seen)
            if why:
                dropped[why] += 1
                continue
            kept.append((p, rec))
            unverified += cfg.verify != "none" and p.reference is None
    report = {"kept": len(kept), "dropped": sum(dropped.values()), "dropped_by_reason": dict(dropped)}
    if cfg.verify != "none":
        report["kept_without_reference"] = unverified
    return kept, report
