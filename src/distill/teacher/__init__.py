"""The teacher signal: what the student learns from (live model, top-k cache, API, another tokenizer).

``factory.training_signal`` is the one place that chooses among them.

Public names, by module:

    factory: training_signal, TrainingSignal, load_teacher, training_teacher, tokenizer_ref,
        other_tokenizer, cache_expectations, cache_tail
    signal: TeacherSignal, LiveTeacher, HeadRows, sample_key
    generate: generate_answers, LlamaCppEngine
    examples: training_examples, kept_examples, kept_text_examples
    filters: filter_answers
    cache: build_cache, build_cross_cache, verify_cache, CachedTeacher, CachedCrossTeacher, CacheMeta,
        CacheError
    api: generate_api_answers, training_answers, ApiGrader, api_signal, api_cache_rows
    api_client: ApiTeacher, ApiError, RateLimiter
    crosstok: CrossTeacher, CrossSignal, build_item, CROSS_ROWS
    alignment: align, alignment_shares, token_pieces, Chunk
    audit: audit_models, audit_tokenizers, Audit
"""

from distill.teacher.alignment import Chunk, align, alignment_shares, token_pieces
from distill.teacher.api import ApiGrader, api_cache_rows, api_signal, generate_api_answers, training_answers
from distill.teacher.api_client import ApiError, ApiTeacher, RateLimiter
from distill.teacher.audit import Audit, audit_models, audit_tokenizers
from distill.teacher.cache import (
    CachedCrossTeacher,
    CachedTeacher,
    CacheError,
    CacheMeta,
    build_cache,
    build_cross_cache,
    verify_cache,
)
from distill.teacher.crosstok import CROSS_ROWS, CrossSignal, CrossTeacher, build_item
from distill.teacher.examples import kept_examples, kept_text_examples, training_examples
from distill.teacher.factory import (
    TrainingSignal,
    cache_expectations,
    cache_tail,
    load_teacher,
    other_tokenizer,
    tokenizer_ref,
    training_signal,
    training_teacher,
)
from distill.teacher.filters import filter_answers
from distill.teacher.generate import LlamaCppEngine, generate_answers
from distill.teacher.signal import HeadRows, LiveTeacher, TeacherSignal, sample_key

__all__ = [
    "ApiError",
    "ApiGrader",
    "ApiTeacher",
    "Audit",
    "CROSS_ROWS",
    "CacheError",
    "CacheMeta",
    "CachedCrossTeacher",
    "CachedTeacher",
    "Chunk",
    "CrossSignal",
    "CrossTeacher",
    "HeadRows",
    "LiveTeacher",
    "LlamaCppEngine",
    "RateLimiter",
    "TeacherSignal",
    "TrainingSignal",
    "align",
    "alignment_shares",
    "api_cache_rows",
    "api_signal",
    "audit_models",
    "audit_tokenizers",
    "build_cache",
    "build_cross_cache",
    "build_item",
    "cache_expectations",
    "cache_tail",
    "filter_answers",
    "generate_answers",
    "generate_api_answers",
    "kept_examples",
    "kept_text_examples",
    "load_teacher",
    "other_tokenizer",
    "sample_key",
    "token_pieces",
    "tokenizer_ref",
    "training_answers",
    "training_examples",
    "training_signal",
    "training_teacher",
    "verify_cache",
]
