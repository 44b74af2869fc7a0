"""cache: the teacher's top-k log-probs for every training sequence, scored once -> teacher_cache/."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from distill.core.config import RunConfig
from distill.core.errors import StageError, need
from distill.core.models import (
    load_tokenizer,
)
from distill.core.progress import console
from distill.stages.run_folder import load_split, run_answers, setup
from distill.teacher.api import api_cache_rows
from distill.teacher.cache import (
    CacheMeta,
    build_cache,
    verify_cache,
)
from distill.teacher.examples import kept_examples, kept_text_examples
from distill.teacher.factory import (
    cache_expectations,
    cross_cache_expectations,
    cross_teacher,
    load_teacher,
    other_tokenizer,
    tokenizer_ref,
)


def build_teacher_cache(cfg: RunConfig) -> Path:
    """Score the training sequences with the teacher once -> teacher_cache/ (resumable).

    For an API teacher the scores are the top log-probs the server returned with each
    answer (no new requests); the cache then has k = ``teacher.api.top_logprobs``.
    """
    run, cfg = setup(cfg)
    answers = run_answers(cfg, run)
    train_p, _ = load_split(cfg)
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    # a student with its own tokenizer (its untrained copy has it) gets a cache across tokenizers
    s_tok = None
    if cfg.train.cross_tokenizer != "off":
        s_tok = AutoTokenizer.from_pretrained(need(run / "student_init", "shrink"))
    if s_tok is not None and other_tokenizer(cfg, s_tok) is not None:
        from distill.teacher.cache import build_cross_cache

        kept_text, _ = kept_text_examples(cfg, s_tok, train_p, answers)
        teacher, _ = cross_teacher(cfg, tok, s_tok, kept_text)
        expected = cross_cache_expectations(cfg, tok, s_tok)
        meta = CacheMeta(**expected, vocab_size=len(s_tok), id_dtype="int32", logprob_dtype="float16",
                         samples_per_shard=cfg.cache.samples_per_shard,
                         num_samples=len(teacher.items))  # fmt: skip
        out = build_cross_cache(teacher, run / "teacher_cache", meta, batch_size=cfg.cache.batch_size)
        console.print(f"teacher cache ({cfg.train.cross_tokenizer}, across tokenizers) for "
                      f"{len(teacher.items)} samples in {out}")  # fmt: skip
        return out
    kept, _ = kept_examples(cfg, tok, train_p, answers)
    examples = [ex for ex, _ in kept]
    expected = cache_expectations(cfg, tok)
    if cfg.teacher.kind == "openai":
        if not expected["k"]:
            raise StageError("an API teacher without top_logprobs gives no scores to cache; "
                             "set teacher.api.top_logprobs (e.g. 20) and rerun distill generate")  # fmt: skip
        from distill.teacher.signal import sample_key

        rows = {
            sample_key(ex[0]): api_cache_rows(ex, rec, expected["k"], tok.eos_token_id) for ex, rec in kept
        }

        def teacher(batch):
            return [rows[sample_key(ex[0])] for ex in batch]
    else:  # scored in fp32 whatever the generation dtype: these log-probs are stored and reused
        teacher = load_teacher(cfg, torch.float32)
    meta = CacheMeta(
        **expected, vocab_size=len(tok), id_dtype="uint16" if len(tok) <= 65536 else "int32",
        logprob_dtype="float16", samples_per_shard=cfg.cache.samples_per_shard, num_samples=len(examples),
    )  # fmt: skip
    out = build_cache(teacher, examples, run / "teacher_cache", meta, pad_id=tok.pad_token_id,
                      batch_size=cfg.cache.batch_size)  # fmt: skip
    console.print(f"teacher cache for {len(examples)} samples in {out}")
    return out


def verify_teacher_cache(cfg: RunConfig) -> list[str]:
    """Check every shard of the run's cache against its checksum; returns the problems."""
    return verify_cache(need(cfg.run_dir / "teacher_cache", "cache"))
