"""Choosing the teacher signal: the one place that decides what the student learns from.

``training_signal`` reads the config and the run folder and returns the signal the training loop
consumes: a live teacher (logits, hidden states), a top-k cache (local or API scores), a teacher
across tokenizers (live or cached), or none (the teacher's text alone), and who grades the
student's own samples when training is on-policy. Nothing else branches on the teacher's kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.core.config import RunConfig, TrainConfig
from distill.core.data import (
    prompt_token_ids,
)
from distill.core.errors import StageError, need
from distill.core.hardware import resolve_device
from distill.core.models import (
    load_model,
    load_tokenizer,
    resolve_model_dir,
)
from distill.teacher.cache import (
    CachedTeacher,
    tokenizer_hash,
    weights_hash,
)
from distill.teacher.crosstok import CROSS_ROWS
from distill.teacher.signal import LiveTeacher


def teacher_device(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.teacher.device)


def load_teacher(cfg: RunConfig, dtype: torch.dtype, device: torch.device | None = None):
    """The local teacher in ``dtype`` on ``teacher.device`` (or ``device``), spread by ``device_map``."""
    t = cfg.teacher
    return load_model(t.model, dtype=dtype, device=device or teacher_device(cfg), device_map=t.device_map,
                      trust_remote_code=t.trust_remote_code)  # fmt: skip


def tokenizer_ref(cfg: RunConfig) -> str:
    """The model whose tokenizer encodes prompts and answers: the teacher's local copy, else the student."""
    return cfg.teacher.model or cfg.student.model  # the config guarantees one of them


def other_tokenizer(cfg: RunConfig, student_tok):
    """The teacher's tokenizer when the student's is another one (None: they are the same)."""
    if not cfg.teacher.model:
        return None
    t_tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    return t_tok if t_tok.get_vocab() != student_tok.get_vocab() else None


def cross_teacher(cfg: RunConfig, t_tok, s_tok, kept: list, cache_dir: Path | None = None) -> tuple:
    """A ``CrossTeacher`` for the kept samples, and the share of the student's tokens it aligns. With
    ``cache_dir`` the samples' signal is read from that cache, and the teacher is loaded only to grade
    the student's own samples (train.onpolicy_fraction > 0)."""
    from distill.teacher.alignment import alignment_shares, token_pieces
    from distill.teacher.crosstok import CrossTeacher, build_item
    from distill.teacher.signal import sample_key

    items, chunks, n_tokens, prompts = {}, [], 0, {}
    for (ids, mask), rec, p in kept:
        kw = {"system_prompt": cfg.data.system_prompt, "max_tokens": cfg.data.max_prompt_tokens}
        s_prompt, t_prompt = prompt_token_ids(s_tok, p, **kw), prompt_token_ids(t_tok, p, **kw)
        prompts[tuple(s_prompt)] = t_prompt  # for the student's own samples (on-policy)
        stop = rec.get("finish_reason") == "stop"
        item = build_item(s_prompt, t_prompt, rec["text"], s_tok, t_tok, stop, cfg.train.max_seq_len)
        n_tokens += sum(mask)
        if item is not None:
            items[sample_key(ids)] = item
            chunks += item.chunks
    # the teacher model grades, and needs the tokens map (15 s for Gemma's vocabulary), unless a cache
    # answers for every sample: then only the student's own samples (on-policy) are new
    grades = cache_dir is None or cfg.train.onpolicy_fraction > 0
    pieces = token_pieces(t_tok, s_tok) if cfg.train.cross_tokenizer == "span" and grades else None
    kw = {"method": cfg.train.cross_tokenizer, "k": cfg.train.cross_topk, "pieces": pieces,
          "pad_id": t_tok.pad_token_id, "tokenizers": (s_tok, t_tok), "prompts": prompts,
          "max_len": cfg.train.max_seq_len, "chunk_loss": cfg.train.cross_chunk}  # fmt: skip
    if cache_dir is not None:
        from distill.teacher.cache import CachedCrossTeacher

        model = training_teacher(cfg) if grades else None
        expected = cross_cache_expectations(cfg, t_tok, s_tok)
        teacher = CachedCrossTeacher(cache_dir, expected, items, model=model, **kw)
    else:
        teacher = CrossTeacher(training_teacher(cfg), items, **kw)
    return teacher, alignment_shares(chunks, n_tokens)


def cache_expectations(cfg: RunConfig, tok) -> dict:
    if cfg.teacher.kind == "openai":
        api = cfg.teacher.api
        return {
            "teacher": f"openai:{api.model}@{api.base_url}",
            "teacher_weights_hash": "api",
            "tokenizer_hash": tokenizer_hash(tok),
            "k": api.top_logprobs,
            "scoring_temperature": 1.0,
            "tail_samples": 0,
            "cross_tokenizer": "off",
        }
    return {
        "teacher": cfg.teacher.model,
        "teacher_weights_hash": weights_hash(resolve_model_dir(cfg.teacher.model)),
        "tokenizer_hash": tokenizer_hash(tok),
        "k": cfg.cache.k,
        "scoring_temperature": cfg.cache.scoring_temperature,
        "tail_samples": cfg.cache.tail_samples,
        "cross_tokenizer": "off",
    }


def cross_cache_expectations(cfg: RunConfig, t_tok, s_tok) -> dict:
    """What a cache across tokenizers must have been made with: the teacher's weights, both
    tokenizers, the method and train.cross_topk (its k)."""
    return {
        "teacher": cfg.teacher.model,
        "teacher_weights_hash": weights_hash(resolve_model_dir(cfg.teacher.model)),
        "tokenizer_hash": tokenizer_hash(t_tok),
        "student_tokenizer_hash": tokenizer_hash(s_tok),
        "cross_tokenizer": cfg.train.cross_tokenizer,
        "cross_rows": CROSS_ROWS[cfg.train.cross_tokenizer],
        "k": cfg.train.cross_topk,
        "scoring_temperature": 1.0,
        "tail_samples": 0,
    }


def cache_tail(cfg: RunConfig) -> str:
    """``cache.tail`` with ``auto`` narrowed to what the loss allows; the cache then picks tail
    samples if it holds them, else a bucket."""
    if cfg.cache.tail != "auto":
        return cfg.cache.tail
    if cfg.train.distill_temperature != 1.0 or cfg.cache.scoring_temperature != 1.0:
        return "renormalize"  # the tail mass and samples are only known at the scoring temperature
    return "auto" if cfg.train.loss == "forward_kl" else "bucket"


def training_teacher(cfg: RunConfig):
    """The local teacher for training, in the training precision. It goes where teacher.device says;
    auto: the CPU for now, moved beside the student once accelerate has said where that is."""
    tdtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    place = torch.device("cpu") if cfg.teacher.device == "auto" else None
    return load_teacher(cfg, tdtype, device=place)


@dataclass
class TrainingSignal:
    """What training learns from: ``teacher`` for the teacher's rows (None: its text alone),
    ``grader`` for the student's own samples (None: the teacher grades them, or no on-policy rows),
    ``source`` in words, the alignment shares of a teacher across tokenizers, and the training
    config (alpha set to 0 where an API gives no scores)."""

    teacher: object | None
    grader: object | None
    source: str
    grader_source: str
    alignment: dict | None
    train: TrainConfig


def training_signal(cfg: RunConfig, run: Path, tok, t_tok, kept: list, kept_text: list | None,
                    layer_map: Callable[[int], list[int]]) -> TrainingSignal:  # fmt: skip
    """The teacher signal of a run for the kept training samples (``kept``: (example, record); with
    a student of its own tokenizer ``t_tok`` is the teacher's and ``kept_text`` the samples read as
    text). ``layer_map(teacher_layers)`` gives the teacher layer of each student layer for hidden
    alignment. Raises ``StageError`` where the config asks for a signal the run cannot give."""
    examples = [ex for ex, _ in kept]
    teacher = None
    tcfg = cfg.train
    api = cfg.teacher.kind == "openai"
    alignment = None
    # the student's own samples (on-policy rows) are graded by the teacher whatever alpha weighs
    grades = cfg.train.alpha > 0 or cfg.train.onpolicy_fraction > 0
    if t_tok is not None and grades and cfg.train.cross_tokenizer != "off":
        cached = cfg.cache.use and cfg.train.alpha > 0  # no cache is made for alpha = 0
        cache_dir = need(run / "teacher_cache", "cache") if cached else None
        teacher, alignment = cross_teacher(cfg, t_tok, tok, kept_text, cache_dir)
        method, share, one = cfg.train.cross_tokenizer, alignment["any"], alignment["one_to_one"]
        where = "cached" if cache_dir else "live"
        dist = f", {alignment['one_teacher_token']:.0%} with a distribution" if method == "span" else ""
        source = (f"{where} teacher, another tokenizer: {method} on {share:.0%} of the student's answer "
                  f"tokens ({one:.0%} one token to one{dist})")  # fmt: skip
    elif t_tok is not None and grades:
        raise StageError("the student's tokenizer is not the teacher's: set train.cross_tokenizer (span or "
                         "uld), or train.alpha=0 and train.onpolicy_fraction=0 for the teacher's text "
                         "alone")  # fmt: skip
    elif t_tok is not None:
        source = "the teacher's text only, in the student's own tokens (alpha = 0)"
    elif cfg.train.alpha > 0 and (cfg.cache.use or (api and cfg.teacher.api.top_logprobs)):
        cache_dir = need(run / "teacher_cache", "cache")
        teacher = CachedTeacher(cache_dir, cache_expectations(cfg, tok), examples, tail=cache_tail(cfg))
        source = f"cached top-{teacher.meta.k} teacher log-probs" + (" from the API" if api else "")
        samples = f" ({teacher.meta.tail_samples} samples)" if teacher.tail == "sample" else ""
        source += f", tail: {teacher.tail}{samples}"
    elif cfg.train.alpha > 0 and api:
        tcfg = cfg.train.model_copy(update={"alpha": 0.0})
        source = "the API teacher's text only (sequence-level KD; alpha set to 0: no teacher logits)"
    elif cfg.train.alpha > 0 or cfg.train.hidden_weight > 0:
        t_model = training_teacher(cfg)
        align = layer_map(t_model.config.num_hidden_layers) if cfg.train.hidden_weight else None
        teacher = LiveTeacher(t_model, align_layers=align)
        source = "live teacher logits" + (f", hidden states of layers {align}" if align else "")
    else:
        source = "the teacher's text only (alpha = 0)"
    grader, grader_source = None, ""  # on-policy rows, where the signal is a cache or text: who grades
    if cfg.train.onpolicy_fraction > 0 and api:
        from distill.teacher.api import ApiGrader

        grader = ApiGrader(cfg.teacher.api, tok)
        grader_source = "; the student's own samples graded by the API (completions, echoed log-probs)"
    elif cfg.train.onpolicy_fraction > 0 and (teacher is None or isinstance(teacher, CachedTeacher)):
        grader = LiveTeacher(training_teacher(cfg))  # alpha = 0 builds no teacher for the other rows
        grader_source = "; the student's own samples graded by the live teacher"
    return TrainingSignal(teacher, grader, source, grader_source, alignment, tcfg)
