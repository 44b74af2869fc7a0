"""The pipeline stages as plain functions over one run folder.

Each stage reads the files earlier stages wrote under ``runs/<name>/`` and writes its own:

    config.yaml      resolved config           (every stage)
    split.json       train / held-out ids      (prepare)
    answers.jsonl    teacher answers           (generate)
    student_init/    untrained student         (shrink)
    teacher_cache/   top-k teacher log-probs   (cache; only when cache.use)
    student/         trained student           (train; checkpoints/ and metrics.jsonl beside it)
    eval.json        teacher vs students       (evaluate; eval_answers.jsonl)
    report/          report.md with plots      (evaluate: loss curve, quality kept, speed)
    export/          HF folder + model card    (export)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from distill import fsio
from distill.cache import CachedTeacher, CacheMeta, build_cache, tokenizer_hash, verify_cache, weights_hash
from distill.config import LoraConfig, RunConfig, dump_config
from distill.crosstok import CROSS_ROWS
from distill.data import (
    Prompt,
    make_example,
    prompt_token_ids,
    read_prompts,
    split_prompts,
    with_system_prompt,
)
from distill.evaluate import compare_speed, evaluate_model, peak_memory, results_table
from distill.export import export_student
from distill.filters import filter_answers
from distill.generate import (
    LlamaCppEngine,
    answer_key,
    eos_ids,
    generate_answers,
    read_answers,
    read_log,
    write_records,
)
from distill.hardware import DTYPES, Precision, choose_precision, resolve_device
from distill.models import (
    count_params,
    load_model,
    load_tokenizer,
    resolve_gguf,
    resolve_model_dir,
)
from distill.preflight import ModelFacts, check_run
from distill.progress import console
from distill.report import environment, write_report
from distill.stats import quality_intervals
from distill.student import choose_student
from distill.teacher import LiveTeacher
from distill.train import attach_hidden_projection, detach_hidden_projection, train


class StageError(RuntimeError):
    """A stage cannot start: an earlier stage's output is missing."""


_CHECKED: dict[str, tuple[RunConfig, dict[str, Precision]]] = {}  # config JSON -> resolved, this process


def prepare(cfg: RunConfig) -> tuple[RunConfig, dict[str, Precision]]:
    """Check ``cfg`` against its files (``check_run``) and resolve every ``dtype: auto``.

    Returns the config with concrete dtypes, and the precision chosen for each purpose (teacher,
    train, speed) with its reason, printed once per process. Nothing is written.
    """
    key = cfg.model_dump_json()
    if key in _CHECKED:
        return _CHECKED[key]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    facts = check_run(cfg)
    resolved, precision = resolve_precision(cfg, facts.get("teacher") or facts.get("student"))
    _CHECKED[key] = _CHECKED[resolved.model_dump_json()] = (resolved, precision)
    reasons = {p.reason for p in precision.values()}
    names = ", ".join(f"{k} {p.dtype}" for k, p in precision.items())
    console.print(f"precision: {names}" + (f" ({reasons.pop()})" if len(reasons) == 1 else ""))
    for k, p in precision.items() if len(reasons) > 1 else ():
        console.print(f"  {k}: {p.reason}")
    return resolved, precision


def resolve_precision(cfg: RunConfig, shape: ModelFacts | None) -> tuple[RunConfig, dict[str, Precision]]:
    """``cfg`` with ``teacher.dtype``, ``train.dtype`` and ``evaluate.speed_dtype`` made concrete.

    An explicit dtype stays; ``auto`` is decided by ``distill.hardware.choose_precision`` on the
    device each runs on, with a matmul probe at the model's shapes (``shape``) on a CPU.
    """
    hidden, inter = (shape.hidden_size, shape.intermediate_size) if shape else (1024, 4096)
    train_dev = resolve_device("auto")
    precision = {
        "teacher": choose_precision(cfg.teacher.dtype, resolve_device(cfg.teacher.device), hidden, inter),
        "train": choose_precision(cfg.train.dtype, train_dev, hidden, inter),
        "speed": choose_precision(cfg.evaluate.speed_dtype, train_dev, hidden, inter),
    }
    resolved = cfg.model_copy(deep=True)
    resolved.teacher.dtype = precision["teacher"].dtype
    resolved.train.dtype = precision["train"].dtype
    resolved.evaluate.speed_dtype = precision["speed"].dtype
    return resolved, precision


# What each stage's output was made from: a run folder holding the output refuses a config that
# differs in these (dotted keys; a section name covers every key under it).
MADE_FROM = {
    "split.json": ("data.path", "data.format", "data.max_prompts", "data.heldout_size", "data.split_seed"),
    "answers.jsonl": (
        "data.path", "data.format", "data.max_prompts", "data.system_prompt", "data.max_prompt_tokens",
        "teacher.kind", "teacher.model", "teacher.engine", "teacher.api.base_url", "teacher.api.model",
        "teacher.api.endpoint", "teacher.api.temperature", "teacher.api.max_tokens", "teacher.api.n",
        "generate.max_new_tokens", "generate.do_sample", "generate.generation_temperature", "generate.top_p",
        "generate.seed",
    ),
    "student_init": ("teacher.model", "student"),
}  # fmt: skip
_FORCE: list[bool] = [False]


@contextmanager
def allow_config_change() -> Iterator[None]:
    """Inside, a run folder made by another config is used anyway (``--force``)."""
    _FORCE[0] = True
    try:
        yield
    finally:
        _FORCE[0] = False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(run: Path, cfg: RunConfig) -> None:
    """Refuse a run folder whose finished outputs came from a config that differs where it matters
    for them, naming the fields (``StageError``); ``allow_config_change`` lets it through."""
    old_path = run / "config.yaml"
    if _FORCE[0] or not old_path.is_file():
        return
    old, new = _flat(yaml.safe_load(old_path.read_text()) or {}), _flat(cfg.model_dump(mode="json"))
    differ: dict[str, list[str]] = {}
    for output, keys in MADE_FROM.items():
        if not (run / output).exists():
            continue
        for key in sorted(set(old) | set(new)):
            if any(key == k or key.startswith(k + ".") for k in keys) and old.get(key) != new.get(key):
                differ.setdefault(key, []).append(output)
    if differ:
        fields = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now (made {', '.join(v)})"
                           for k, v in differ.items())  # fmt: skip
        raise StageError(f"{run} was made by another config ({fields}); use another run name, or --force to "
                         "use this folder anyway")  # fmt: skip


def _setup(cfg: RunConfig) -> tuple[Path, RunConfig]:
    """Check the run, resolve its precision, then make the run folder (never before: a run that
    cannot start leaves nothing behind) with the resolved config.yaml and precision.json."""
    cfg, precision = prepare(cfg)
    run = cfg.run_dir
    check_same_run(run, cfg)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    chosen = {k: p.as_dict() for k, p in precision.items()}
    fsio.write_text(run / "precision.json", json.dumps(chosen, indent=1))
    return run, cfg


def _write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it over ``path``: readers see the old or the new."""
    fsio.write_text(path, json.dumps(obj, indent=1))


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run `distill {stage}` for this run first")
    return path


def load_split(cfg: RunConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The (train, held-out) prompts of the run, fixed once in split.json."""
    prompts = read_prompts(cfg.data.path, cfg.data.format)
    if cfg.data.max_prompts:
        prompts = prompts[: cfg.data.max_prompts]
    split_path = cfg.run_dir / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
        by_id = {p.id: p for p in prompts}
        missing = [i for i in split["train"] + split["heldout"] if i not in by_id]
        if missing:
            raise StageError(
                f"{split_path}: {len(missing)} prompt ids (e.g. {missing[0]}) are not in the "
                "data any more; use a new run name for new data"
            )
        return [by_id[i] for i in split["train"]], [by_id[i] for i in split["heldout"]]
    train_p, held = split_prompts(prompts, cfg.data.heldout_size, cfg.data.split_seed)
    split = {"train": [p.id for p in train_p], "heldout": [p.id for p in held]}
    fsio.write_text(split_path, json.dumps(split))
    return train_p, held


def _teacher_device(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.teacher.device)


def _load_teacher(cfg: RunConfig, dtype: torch.dtype, device: torch.device | None = None):
    """The local teacher in ``dtype`` on ``teacher.device`` (or ``device``), spread by ``device_map``."""
    t = cfg.teacher
    return load_model(t.model, dtype=dtype, device=device or _teacher_device(cfg), device_map=t.device_map,
                      trust_remote_code=t.trust_remote_code)  # fmt: skip


def tokenizer_ref(cfg: RunConfig) -> str:
    """The model whose tokenizer encodes prompts and answers: the teacher's local copy, else the student."""
    return cfg.teacher.model or cfg.student.model  # the config guarantees one of them


def generate(cfg: RunConfig) -> Path:
    """Teacher answers for every prompt (train and held-out) -> answers.jsonl."""
    run, cfg = _setup(cfg)
    train_p, held = load_split(cfg)
    if cfg.teacher.kind == "openai":
        return _generate_api(cfg, train_p + held)
    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    model = engine = None
    if cfg.teacher.engine == "llama_cpp":
        gguf = resolve_gguf(cfg.teacher.model)
        if gguf is None:
            raise StageError(
                f"teacher.engine=llama_cpp needs a .gguf teacher; {cfg.teacher.model} is not one"
            )
        gen_cfg = GenerationConfig.from_pretrained(resolve_model_dir(cfg.teacher.model))
        engine = LlamaCppEngine(gguf, eos_ids(gen_cfg, tok), threads=cfg.threads)
    else:
        model = _load_teacher(cfg, DTYPES[cfg.teacher.dtype])
    out = run / "answers.jsonl"
    answers = generate_answers(
        model, tok, train_p + held, out, cfg.generate, engine=engine,
        system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
    )  # fmt: skip
    stops = sum(a["finish_reason"] == "stop" for a in answers.values())
    console.print(f"{len(answers)} teacher answers in {out} ({stops} ended with eos)")
    return out


def _generate_api(cfg: RunConfig, prompts: list[Prompt]) -> Path:
    """Answers from an OpenAI-compatible endpoint: api_log.jsonl (every outcome, append-only),
    then answers.jsonl (the successes in our tokenizer) and generate_summary.json."""
    from distill.api import generate_api_answers, log_totals, training_answers

    run = cfg.run_dir
    api = cfg.teacher.api
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)

    def render(p: Prompt) -> str:  # p already carries the system turn
        return tok.decode(prompt_token_ids(tok, p, max_tokens=cfg.data.max_prompt_tokens))

    prompts = [with_system_prompt(p, cfg.data.system_prompt) for p in prompts]
    log_path = run / "api_log.jsonl"
    console.print(f"teacher: {api.model} at {api.base_url} ({api.endpoint} endpoint, "
                  f"{api.concurrency} in flight)")  # fmt: skip
    stats = generate_api_answers(api, prompts, log_path, render=render)
    log = read_log(log_path)
    records, mapping = training_answers(log, tok, tok.eos_token_id, api.top_logprobs)
    out = run / "answers.jsonl"
    tmp = out.with_name("answers.jsonl.tmp")
    with tmp.open("w") as f:
        write_records(f, records)
    os.replace(tmp, out)
    signal = _api_signal(cfg, mapping)
    summary = {
        "this_run": stats.as_dict(),
        "total": log_totals(log, prompts, api),
        "logprob_mapping": mapping,
        "teacher_signal": signal,
    }
    fsio.write_text(run / "generate_summary.json", json.dumps(summary, indent=1))
    r = summary["this_run"]
    console.print(
        f"this run: {r['done']} answers, {r['failed']} failed {r['failed_by_cause'] or ''}, "
        f"{r['retries']} retries {r['retried_by_cause'] or ''}, {r['completion_tokens']:,} tokens, "
        f"${r['cost_usd']:.4f}, {r['answers_per_s']:.2f} answers/s"
    )
    t = summary["total"]
    console.print(f"in all: {t['answers']} answers, {t['missing']} missing, ${t['cost_usd']:.4f}; {out}")
    console.print(f"teacher signal for training: {signal}")
    return out


def _api_signal(cfg: RunConfig, mapping: dict) -> str:
    """Which signal an API teacher gives training, in words (also written to the run's logs)."""
    if cfg.teacher.api.top_logprobs == 0:
        return "text only (sequence-level KD: cross-entropy on the teacher's answers)"
    if mapping["logprobs_mapped"] == 0:
        return (
            "text only (sequence-level KD): the server's tokens do not map to this tokenizer "
            f"({mapping['logprobs_unmapped']} answers tried)"
        )
    return (
        f"sparse top-{cfg.teacher.api.top_logprobs} log-probs for {mapping['logprobs_mapped']} answers "
        f"(tokens mapped to ids and checked), text for {mapping['logprobs_unmapped']}"
    )


def shrink(cfg: RunConfig) -> Path:
    """The untrained student -> student_init/ (shrunk teacher, or a given model)."""
    run, cfg = _setup(cfg)
    out = run / "student_init"
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    if cfg.student.init == "shrink":
        teacher = load_model(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
        n = teacher.config.num_hidden_layers
        student, layers = _choose_student(cfg, teacher, tok, run)
        c = student.config
        console.print(
            f"student keeps teacher layers {layers} of {n}, {c.num_attention_heads} heads and "
            f"{c.intermediate_size} MLP channels each, {c.hidden_size} residual channels "
            f"({count_params(student) / 1e6:.1f}M parameters)"
        )
    else:
        student = load_model(cfg.student.model, trust_remote_code=cfg.teacher.trust_remote_code)
        s_tok = load_tokenizer(cfg.student.model)
        if cfg.teacher.model and s_tok.get_vocab() != tok.get_vocab():
            if cfg.train.alpha > 0 and cfg.train.cross_tokenizer == "off":
                raise StageError(
                    f"student {cfg.student.model} has a different tokenizer from teacher "
                    f"{cfg.teacher.model}; token-level distillation needs the same vocabulary "
                    "(set train.cross_tokenizer, or train.alpha=0 for the teacher's text alone)"
                )
            tok = s_tok  # it keeps its own tokenizer and reads the teacher's answers as text
    tmp = out.with_name("student_init.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fsio.save_pretrained(student, tok, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays
        raise
    if cfg.student.init == "shrink":  # what hidden-state alignment pairs each student layer with
        fsio.write_text(tmp / "layer_map.json", json.dumps({"teacher_layers": layers}))
    tmp.rename(out)
    return out


def _choose_student(cfg: RunConfig, teacher, tok, run: Path):
    """The shrunk student and its layers (``distill.student``). With the teacher's answers, the
    candidates are scored on calibration answers and recorded in ``student_candidates.json``."""
    s = cfg.student
    answers_path = run / "answers.jsonl"
    calib = None
    if answers_path.is_file():
        train_p, _ = load_split(cfg)
        calib = training_examples(cfg, tok, train_p, read_answers(answers_path))[: s.calibration_samples]
    measured = (
        s.layer_selection == "importance"
        or s.num_heads
        or s.intermediate_size
        or s.hidden_size
        or s.target_params
        or s.target_speedup
    )
    if measured and not calib:
        raise StageError(f"student.layer_selection=importance, num_heads, intermediate_size and the "
                         f"target_* searches score the teacher on its answers: {answers_path} has none; "
                         "run `distill generate` first")  # fmt: skip
    try:
        student, chosen, report = choose_student(s, teacher, tok, calib, DTYPES[cfg.evaluate.speed_dtype])
    except ValueError as exc:  # no shape meets the targets
        raise StageError(str(exc)) from None
    if report:
        fsio.write_text(run / "student_candidates.json", json.dumps(report, indent=1))
    return student, chosen.layers


def _kept(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> tuple[list, dict]:
    """((ids, answer mask), answer record) for every answer the filter keeps, and its report."""
    pairs, report = filter_answers(prompts, answers, cfg.filter)
    out = []
    for p, rec in pairs:
        if rec["token_ids"]:
            ids = prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                   max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            out.append((make_example(ids, rec["token_ids"], cfg.train.max_seq_len), rec))
    return out, report


def _kept_text(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> tuple[list, dict]:
    """``_kept`` for a student with its own tokenizer: the teacher's answers read as text, in the
    student's tokens (and its EOS where the teacher stopped); ((ids, mask), record, prompt)."""
    from distill.crosstok import student_answer_ids

    pairs, report = filter_answers(prompts, answers, cfg.filter)
    out = []
    for p, rec in pairs:
        answer = student_answer_ids(tok, rec["text"], rec.get("finish_reason") == "stop")
        if answer:
            ids = prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                   max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            out.append((make_example(ids, answer, cfg.train.max_seq_len), rec, p))
    return out, report


def _own_tokenizer(cfg: RunConfig, student_tok):
    """The teacher's tokenizer when the student's is another one (None: they are the same)."""
    if not cfg.teacher.model:
        return None
    t_tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    return t_tok if t_tok.get_vocab() != student_tok.get_vocab() else None


def _cross_teacher(cfg: RunConfig, t_tok, s_tok, kept: list, cache_dir: Path | None = None) -> tuple:
    """A ``CrossTeacher`` for the kept samples, and the share of the student's tokens it aligns. With
    ``cache_dir`` the samples' signal is read from that cache, and the teacher is loaded only to grade
    the student's own samples (train.onpolicy_fraction > 0)."""
    from distill.cache import sample_key
    from distill.crosstok import CrossTeacher, alignment_shares, build_item, token_pieces

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
        from distill.cache import CachedCrossTeacher

        model = _training_teacher(cfg) if grades else None
        expected = _cross_cache_expectations(cfg, t_tok, s_tok)
        teacher = CachedCrossTeacher(cache_dir, expected, items, model=model, **kw)
    else:
        teacher = CrossTeacher(_training_teacher(cfg), items, **kw)
    return teacher, alignment_shares(chunks, n_tokens)


def training_examples(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> list:
    """(ids, answer mask) pairs for every teacher answer that passes ``cfg.filter``."""
    return [ex for ex, _ in _kept(cfg, tok, prompts, answers)[0]]


def _cache_expectations(cfg: RunConfig, tok) -> dict:
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


def _cross_cache_expectations(cfg: RunConfig, t_tok, s_tok) -> dict:
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


def _api_rows(example, rec: dict, k: int, eos_id: int):
    """Cache rows of one API answer: its mapped top-k (padded with -inf), or, for an answer
    whose tokens did not map, the observed tokens as hard labels (the KD term is then CE)."""
    import numpy as np

    n = sum(example[1])
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    answer = example[0][len(example[0]) - n :]
    top_ids, top_lps = rec.get("top_ids"), rec.get("top_logprobs")
    for r in range(n):
        if top_ids is not None:
            row_ids, row_lps = top_ids[r][:k], top_lps[r][:k]
        else:
            row_ids, row_lps = [answer[r]], [0.0]
        ids[r, : len(row_ids)] = row_ids
        lps[r, : len(row_lps)] = row_lps
    mass = np.exp(lps).sum(-1)
    tail = np.log(np.clip(1.0 - mass, 1e-30, None))
    return ids, lps, tail


def _cache_tail(cfg: RunConfig) -> str:
    """``cache.tail`` with ``auto`` narrowed to what the loss allows; the cache then picks tail
    samples if it holds them, else a bucket."""
    if cfg.cache.tail != "auto":
        return cfg.cache.tail
    if cfg.train.distill_temperature != 1.0 or cfg.cache.scoring_temperature != 1.0:
        return "renormalize"  # the tail mass and samples are only known at the scoring temperature
    return "auto" if cfg.train.loss == "forward_kl" else "bucket"


def build_teacher_cache(cfg: RunConfig) -> Path:
    """Score the training sequences with the teacher once -> teacher_cache/ (resumable).

    For an API teacher the scores are the top log-probs the server returned with each
    answer (no new requests); the cache then has k = ``teacher.api.top_logprobs``.
    """
    run, cfg = _setup(cfg)
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    train_p, _ = load_split(cfg)
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    # a student with its own tokenizer (its untrained copy has it) gets a cache across tokenizers
    s_tok = None
    if cfg.train.cross_tokenizer != "off":
        s_tok = AutoTokenizer.from_pretrained(_need(run / "student_init", "shrink"))
    if s_tok is not None and _own_tokenizer(cfg, s_tok) is not None:
        from distill.cache import build_cross_cache

        kept_text, _ = _kept_text(cfg, s_tok, train_p, answers)
        teacher, _ = _cross_teacher(cfg, tok, s_tok, kept_text)
        expected = _cross_cache_expectations(cfg, tok, s_tok)
        meta = CacheMeta(**expected, vocab_size=len(s_tok), id_dtype="int32", logprob_dtype="float16",
                         samples_per_shard=cfg.cache.samples_per_shard,
                         num_samples=len(teacher.items))  # fmt: skip
        out = build_cross_cache(teacher, run / "teacher_cache", meta, batch_size=cfg.cache.batch_size)
        console.print(f"teacher cache ({cfg.train.cross_tokenizer}, across tokenizers) for "
                      f"{len(teacher.items)} samples in {out}")  # fmt: skip
        return out
    kept, _ = _kept(cfg, tok, train_p, answers)
    examples = [ex for ex, _ in kept]
    expected = _cache_expectations(cfg, tok)
    if cfg.teacher.kind == "openai":
        if not expected["k"]:
            raise StageError("an API teacher without top_logprobs gives no scores to cache; "
                             "set teacher.api.top_logprobs (e.g. 20) and rerun distill generate")  # fmt: skip
        from distill.cache import sample_key

        rows = {sample_key(ex[0]): _api_rows(ex, rec, expected["k"], tok.eos_token_id) for ex, rec in kept}

        def teacher(batch):
            return [rows[sample_key(ex[0])] for ex in batch]
    else:  # scored in fp32 whatever the generation dtype: these log-probs are stored and reused
        teacher = _load_teacher(cfg, torch.float32)
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
    return verify_cache(_need(cfg.run_dir / "teacher_cache", "cache"))


def train_student(cfg: RunConfig, resume: bool = True) -> Path:
    """Distil the teacher into student_init -> student/ (checkpoints let a rerun resume)."""
    run, cfg = _setup(cfg)
    init = _need(run / "student_init", "shrink")
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    train_p, _ = load_split(cfg)
    tok = AutoTokenizer.from_pretrained(init)
    t_tok = _own_tokenizer(cfg, tok)  # the teacher's, when the student has its own
    if t_tok is not None:
        kept_text, filter_report = _kept_text(cfg, tok, train_p, answers)
        kept = [(ex, rec) for ex, rec, _ in kept_text]
    else:
        kept, filter_report = _kept(cfg, tok, train_p, answers)
    examples = [ex for ex, _ in kept]
    if not examples:
        raise StageError(f"no training answers left after the filter ({filter_report}); loosen `filter`")
    student = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    teacher = None
    tcfg = cfg.train
    api = cfg.teacher.kind == "openai"
    alignment = None
    # the student's own samples (on-policy rows) are graded by the teacher whatever alpha weighs
    grades = cfg.train.alpha > 0 or cfg.train.onpolicy_fraction > 0
    if t_tok is not None and grades and cfg.train.cross_tokenizer != "off":
        cached = cfg.cache.use and cfg.train.alpha > 0  # no cache is made for alpha = 0
        cache_dir = _need(run / "teacher_cache", "cache") if cached else None
        teacher, alignment = _cross_teacher(cfg, t_tok, tok, kept_text, cache_dir)
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
        cache_dir = _need(run / "teacher_cache", "cache")
        teacher = CachedTeacher(cache_dir, _cache_expectations(cfg, tok), examples, tail=_cache_tail(cfg))
        source = f"cached top-{teacher.meta.k} teacher log-probs" + (" from the API" if api else "")
        samples = f" ({teacher.meta.tail_samples} samples)" if teacher.tail == "sample" else ""
        source += f", tail: {teacher.tail}{samples}"
    elif cfg.train.alpha > 0 and api:
        tcfg = cfg.train.model_copy(update={"alpha": 0.0})
        source = "the API teacher's text only (sequence-level KD; alpha set to 0: no teacher logits)"
    elif cfg.train.alpha > 0 or cfg.train.hidden_weight > 0:
        t_model = _training_teacher(cfg)
        align = (
            _layer_map(init, student, t_model.config.num_hidden_layers) if cfg.train.hidden_weight else None
        )
        teacher = LiveTeacher(t_model, align_layers=align)
        source = "live teacher logits" + (f", hidden states of layers {align}" if align else "")
    else:
        source = "the teacher's text only (alpha = 0)"
    # TensorBoard through accelerate's trackers when it is installed (runs/<name>/tensorboard/)
    board = cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is not None
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard" if board else None,
                      project_dir=str(run))  # fmt: skip
    if acc.is_main_process:
        console.print(
            f"training on {len(examples)} teacher answers ({filter_report['dropped']} dropped by the filter: "
            f"{filter_report['dropped_by_reason'] or 'none'}), teacher signal: {source}, "
            f"{acc.num_processes} process(es)"
        )
        fsio.write_text(run / "filter_report.json", json.dumps(filter_report, indent=1))
    grader = None  # on-policy rows, where the teacher signal is a cache or text: who grades the samples
    if cfg.train.onpolicy_fraction > 0 and api:
        from distill.api import ApiGrader

        grader = ApiGrader(cfg.teacher.api, tok)
        source += "; the student's own samples graded by the API (completions, echoed log-probs)"
    elif cfg.train.onpolicy_fraction > 0 and (teacher is None or isinstance(teacher, CachedTeacher)):
        grader = LiveTeacher(_training_teacher(cfg))  # alpha = 0 builds no teacher for the other rows
        source += "; the student's own samples graded by the live teacher"
    for live in (teacher, grader):
        if isinstance(live, LiveTeacher) and cfg.teacher.device == "auto" and not cfg.teacher.device_map:
            live.model.to(acc.device)
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    if cfg.train.lora:
        student = add_lora(student, cfg.train.lora)
    if isinstance(teacher, LiveTeacher) and teacher.align_layers:
        t_width = teacher.model.config.hidden_size
        if attach_hidden_projection(student, t_width, seed=cfg.train.seed):
            source += f" through a learned {student.config.hidden_size} -> {t_width} projection"
    healed = None
    if cfg.heal.data:
        live = teacher if isinstance(teacher, LiveTeacher) else None
        healed = _heal(cfg, run, student, live, tok, acc, resume)
    _check_train_inputs(run, resume, acc.is_main_process)
    summary = train(student, teacher, examples, tcfg, run, pad_id=tok.pad_token_id,
                    vocab_size=len(tok), resume=resume, accelerator=acc, onpolicy_teacher=grader)  # fmt: skip
    summary["teacher_signal"] = source
    if alignment is not None:
        summary["cross_tokenizer_alignment"] = alignment
        sampled = teacher.sampled_counts
        if sampled["samples"]:  # the student's own answers, re-read in the teacher's tokens
            summary["cross_tokenizer_onpolicy"] = {
                "samples": sampled["samples"], "aligned": sampled["aligned"] / sampled["samples"],
                "retokenized": sampled["retokenized"] / sampled["samples"],
                "one_to_one": sampled["one_to_one"] / max(sampled["tokens"], 1),
            }  # fmt: skip
    if healed is not None:
        summary["heal"] = healed
    out = run / "student"
    if acc.is_main_process:
        detach_hidden_projection(student)  # training's own part, not the model's
        if cfg.train.lora:
            student = student.merge_and_unload()  # a plain model: the export needs no peft
        student.config.use_cache = True
        tmp = run / "student.tmp"
        try:
            fsio.save_pretrained(student, tok, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the checkpoints keep the work; no half-written folder
            raise
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        fsio.write_text(run / "train_summary.json", json.dumps(summary, indent=1))
        console.print(f"trained {summary['steps']} steps in {summary['seconds']:.0f}s -> {out}")
    acc.wait_for_everyone()
    return out


TRAIN_INPUTS = ("answers.jsonl", "student_init/model.safetensors", "teacher_cache/meta.json")


def _check_train_inputs(run: Path, resume: bool, main: bool) -> None:
    """Refuse to resume training from checkpoints made with other inputs (answers regenerated, the
    student shrunk again, the cache rebuilt since): the run would mix the two. The fingerprints of
    the inputs are kept in train_inputs.json when training starts."""
    from distill.cache import file_sha256
    from distill.train import latest_checkpoint

    now = {name: file_sha256(run / name) for name in TRAIN_INPUTS if (run / name).is_file()}
    stamp = run / "train_inputs.json"
    if resume and stamp.is_file() and latest_checkpoint(run / "checkpoints") is not None:
        before = json.loads(stamp.read_text())
        changed = [name for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        if changed:
            raise StageError(
                f"{', '.join(changed)} changed since training started (its checkpoints are in "
                f"{run / 'checkpoints'}); resuming would mix the two. Start over with `distill train "
                "--no-resume`, or put the earlier files back"
            )
        return
    if main:
        _write_json_atomic(stamp, now)


def _heal(cfg: RunConfig, run: Path, student, teacher: LiveTeacher | None, tok, acc, resume: bool) -> dict:
    """The healing stage (``cfg.heal``): the student trains on general text before the task data,
    distilled on every token from a live teacher (without one: language modelling alone). Its own
    checkpoints and metrics go to heal/; the healed weights to heal/healed.safetensors, so a rerun
    starts the task stage from them without healing again. Documents that contain a held-out prompt
    are left out."""
    from safetensors.torch import load_model, save_model

    from distill.data import general_text_examples, read_general_text

    out, h = run / "heal", cfg.heal
    done = out / "healed.safetensors"
    if resume and done.is_file():
        load_model(student, done)  # tied weights stored once
        return json.loads((out / "heal_summary.json").read_text())
    _, held = load_split(cfg)
    exclude = [m["content"] for p in held for m in p.messages if m["role"] == "user"]
    examples, report = general_text_examples(tok, read_general_text(h.data), cfg.train.max_seq_len, exclude)
    if not examples:
        raise StageError(
            f"heal.data {h.data}: no text left after leaving out the held-out prompts ({report})"
        )
    live = teacher is not None
    hcfg = cfg.train.model_copy(update={
        "max_steps": h.max_steps, "time_budget": h.time_budget, "lr": h.lr or cfg.train.lr,
        "onpolicy_fraction": 0.0, "prompt_weight": 0.0, "alpha": cfg.train.alpha if live else 0.0,
        "hidden_weight": cfg.train.hidden_weight if live else 0.0,
        "checkpoint_every": min(cfg.train.checkpoint_every, h.max_steps),
    })  # fmt: skip
    if acc.is_main_process:
        console.print(f"healing on general text {h.data}: {report['documents']} documents, "
                      f"{report['tokens']} tokens ({report['dropped_heldout']} left out: they hold a "
                      "held-out prompt)")  # fmt: skip
    summary = train(student, teacher, examples, hcfg, out, pad_id=tok.pad_token_id, vocab_size=len(tok),
                    resume=resume, accelerator=acc)  # fmt: skip
    summary |= {"data": h.data, **report, "signal": "live teacher" if live else "text only (no live teacher)"}
    if acc.is_main_process:
        tmp = out / "healed.safetensors.tmp"
        save_model(student, str(tmp))
        fsio.write_text(out / "heal_summary.json", json.dumps(summary, indent=1))
        os.replace(tmp, done)
    acc.wait_for_everyone()
    return summary


def _training_teacher(cfg: RunConfig):
    """The local teacher for training, in the training precision. It goes where teacher.device says;
    auto: the CPU for now, moved beside the student once accelerate has said where that is."""
    tdtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    place = torch.device("cpu") if cfg.teacher.device == "auto" else None
    return _load_teacher(cfg, tdtype, device=place)


def _layer_map(init: Path, student, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer is aligned with: the layers a shrunk student kept
    (``student_init/layer_map.json``), or for a given student model, spread evenly as in TinyBERT
    (student layer j of S with teacher layer (j + 1) * T / S - 1 of T: the last with the last)."""
    path = init / "layer_map.json"
    n = student.config.num_hidden_layers
    if not path.is_file():
        if n > teacher_layers:
            raise StageError(f"train.hidden_weight: the student has {n} layers, the teacher "
                             f"{teacher_layers}: a deeper student has no layer map")  # fmt: skip
        return [round((j + 1) * teacher_layers / n) - 1 for j in range(n)]
    layers = json.loads(path.read_text())["teacher_layers"]
    if len(layers) != n:
        raise StageError(f"{path}: {len(layers)} layers for a student of {n}")
    return layers


def add_lora(student, lora: LoraConfig):
    """Wrap ``student`` with PEFT LoRA adapters; only the adapters train."""
    try:
        import peft
    except ImportError as exc:
        raise StageError("train.lora needs the peft package: pip install 'distill[lora]'") from exc
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(student, config)


def evaluate(cfg: RunConfig) -> dict:
    """Teacher, untrained student and student on the held-out prompts -> eval.json.

    An API teacher with no local copy (``teacher.model: null``) is scored by its stored
    answers only: no KL or top-1 agreement, and speed-ups are not measured.
    """
    run, cfg = _setup(cfg)
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    _, held = load_split(cfg)
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    ids = {p.id: prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                  max_tokens=cfg.data.max_prompt_tokens) for p in held}  # fmt: skip
    teacher = None
    if cfg.teacher.model:  # fp32: the reference the students' KL is measured against
        teacher = _load_teacher(cfg, torch.float32)
    student_device = resolve_device("auto")
    candidates = {
        "teacher": (teacher, resolve_model_dir(cfg.teacher.model) if teacher is not None else None),
        "untrained_student": (None, _need(run / "student_init", "shrink")),
        "student": (None, _need(run / "student", "train")),
    }
    # a student with its own tokenizer reads prompts and the teacher's answers in its tokens; KL and
    # top-1 agreement pair ids, so they are left out for it (bits per byte compares across tokenizers);
    # the teacher judges its answers' text read again in the teacher's tokens
    s_tok = load_tokenizer(str(candidates["student"][1]))
    own = teacher is not None and s_tok.get_vocab() != tok.get_vocab()
    toks = {name: s_tok if own and name != "teacher" else tok for name in candidates}
    s_ids, s_answers = ids, answers
    if own:
        from distill.crosstok import student_answer_ids

        s_ids = {p.id: prompt_token_ids(s_tok, p, system_prompt=cfg.data.system_prompt,
                                        max_tokens=cfg.data.max_prompt_tokens) for p in held}  # fmt: skip

        def restated(rec: dict) -> dict:
            return {
                **rec,
                "token_ids": student_answer_ids(s_tok, rec["text"], rec.get("finish_reason") == "stop"),
            }

        s_answers = {k: restated(rec) for k, rec in answers.items()}
    results, outputs, models = {}, [], {}
    for name, (model, folder) in candidates.items():
        if model is None and folder is not None:  # a student (an API-only teacher has neither)
            model = (
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(student_device).eval()
            )
        mine = own and name != "teacher"
        res, outs = evaluate_model(
            name, model, None if mine else teacher, toks[name], held, s_ids if mine else ids,
            s_answers if mine else answers, cfg.evaluate, weights_dir=folder,
            max_seq_len=cfg.train.max_seq_len, reference_answers=name == "teacher",
            judge=(teacher, tok, ids) if mine else None,  # its answers judged in the teacher's tokens
        )  # fmt: skip
        results[name], outputs = res, outputs + outs
        if model is not None:
            models[name] = model
    console.print("[dim]measuring generation speed, the models in turn...[/dim]")
    speed_prompts = {name: [(s_ids if own and name != "teacher" else ids)[p.id] for p in held[:4]]
                     for name in candidates}  # fmt: skip
    speed_toks = {name: toks[name] for name in models}
    speeds = compare_speed(models, speed_toks, {n: speed_prompts[n] for n in models}, cfg.evaluate,
                           DTYPES[cfg.evaluate.speed_dtype])  # fmt: skip
    for name, figures in speeds.items():
        results[name].update(figures)
    per_prompt = {name: r.pop("per_prompt") for name, r in results.items()}
    task_results, task_answers = {}, []
    if cfg.evaluate.tasks:
        from distill.tasks import evaluate_tasks

        task_results, task_answers = evaluate_tasks(models, {n: toks[n] for n in models}, cfg)
    for name, r in results.items():  # latency: its mean answer length at its batch-1 rate
        lengths = [row["answer_tokens"] for row in per_prompt[name]]
        r["mean_answer_tokens"] = sum(lengths) / len(lengths) if lengths else None
        rate = r.get("tokens_per_s_batch1")
        r["seconds_per_answer"] = r["mean_answer_tokens"] / rate if rate and lengths else None
    if cfg.evaluate.measure_memory and held:
        console.print("[dim]measuring peak memory, each model in a fresh process...[/dim]")
        for name in ("teacher", "student"):
            if name in models:
                folder = candidates[name][1]
                dtype = DTYPES[cfg.evaluate.speed_dtype]
                results[name].update(
                    peak_memory(folder, speed_prompts[name][0], cfg.evaluate.speed_new_tokens, dtype)
                )
    intervals = quality_intervals(per_prompt, draws=cfg.evaluate.bootstrap_draws)
    t, s, u = results["teacher"], results["student"], results["untrained_student"]
    local = teacher is not None
    results["summary"] = {
        "heldout_prompts": len(held),
        "speedup_batch1": s["tokens_per_s_batch1"] / t["tokens_per_s_batch1"] if local else None,
        "speedup_batched": s["tokens_per_s_batched"] / t["tokens_per_s_batched"] if local else None,
        "size_ratio": s["params"] / t["params"] if local else None,
        "kl_untrained_over_trained": u["kl"] / max(s["kl"], 1e-12) if local and s["kl"] is not None else None,
    }
    gen_summary = run / "generate_summary.json"
    if gen_summary.is_file():
        total = json.loads(gen_summary.read_text())["total"]
        results["summary"]["teacher_cost_usd"] = total["cost_usd"]
        results["summary"]["teacher_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    results["summary"]["price_per_hour"] = cfg.evaluate.price_per_hour
    results["precision"] = json.loads((run / "precision.json").read_text())  # chosen at this stage's start
    results["intervals"] = intervals
    results["tasks"] = task_results
    results["environment"] = environment()
    prompts = {p.id: {"messages": p.messages, "reference": p.reference} for p in held}
    _write_json_atomic(run / "eval_prompts.json", {"prompts": prompts, "models": per_prompt})
    _write_json_atomic(run / "eval.json", results)
    lines = [json.dumps(o, ensure_ascii=False) + "\n" for o in outputs]
    fsio.write_text(run / "eval_answers.jsonl", "".join(lines))
    lines = [json.dumps(o, ensure_ascii=False) + "\n" for o in task_answers]
    fsio.write_text(run / "eval_tasks.jsonl", "".join(lines))
    console.print(results_table({k: v for k, v in results.items() if k in candidates}))
    for name, task in task_results.items():
        accuracy = {m: ci["reference_accuracy"]["value"] for m, ci in task["intervals"]["models"].items()}
        console.print(f"task {name} ({task['items']} items): accuracy "
                      + ", ".join(f"{m} {v:.3f}" for m, v in accuracy.items()))  # fmt: skip
    for warning in intervals["warnings"] + [
        w for t in task_results.values() for w in t["intervals"]["warnings"]
    ]:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    console.print(f"report with plots: {write_report(run, results)}")
    return results


def export(cfg: RunConfig) -> Path:
    """The trained student as a plain Hugging Face folder with a model card -> export/."""
    run, cfg = _setup(cfg)
    student_dir = _need(run / "student", "train")
    eval_path = run / "eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    rows = _check_rows(cfg, student_dir) if cfg.export.check_prompts else None
    teacher_gguf = resolve_gguf(cfg.teacher.model) if cfg.teacher.model else None
    out, check = export_student(student_dir, run / "export", cfg, results, rows, teacher_gguf)
    if check is not None:
        _write_json_atomic(run / "export_check.json", check)
        if results is not None:
            results["export_check"] = check
            _write_json_atomic(eval_path, results)
    written = ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".gguf", ".safetensors")))
    console.print(f"exported {out}: {written}")
    for line in _check_lines(check):
        console.print(line)
    return out


def _check_rows(cfg: RunConfig, student_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, teacher answer ids) of the first held-out prompts, for the export check; a student
    with its own tokenizer reads the answers' text in its own tokens."""
    from distill.crosstok import student_answer_ids

    run = cfg.run_dir
    if not (run / "answers.jsonl").is_file():
        return []
    answers = read_answers(run / "answers.jsonl")
    _, held = load_split(cfg)
    tok = load_tokenizer(str(student_dir))
    own = _own_tokenizer(cfg, tok) is not None  # the teacher's ids would index other tokens
    rows = []
    for p in held:
        rec = answers.get(answer_key(p.id))
        if rec is None or not rec.get("token_ids"):
            continue
        ids = prompt_token_ids(
            tok, p, system_prompt=cfg.data.system_prompt, max_tokens=cfg.data.max_prompt_tokens
        )
        stop = rec.get("finish_reason") == "stop"
        answer = student_answer_ids(tok, rec["text"], stop) if own else rec["token_ids"]
        rows.append((list(ids), list(answer)[: cfg.train.max_seq_len]))
        if len(rows) == cfg.export.check_prompts:
            break
    return rows


def _check_lines(check: dict | None) -> list[str]:
    if not check:
        return []
    lines = []
    if "hf" in check:
        h = check["hf"]
        lines.append(
            f"  check, Hugging Face folder: greedy same on {h['greedy_match']:.0%} of "
            f"{check['prompts']} held-out prompts, max |log-prob diff| {h['logprob_abs_diff_max']:.2g}"
            + (f"; serving problems: {'; '.join(h['serving_problems'])}" if h["serving_problems"] else "")
        )
    g = check.get("gguf") or {}
    for r in (g.get("files") or {}).values():
        lines.append(
            f"  check, {r['file']} in llama.cpp: greedy same {r['greedy_match']:.0%}, mean |log-prob diff| "
            f"{r['logprob_abs_diff_mean']:.2g}, perplexity {r['perplexity']:.3f} "
            f"({r.get('perplexity_vs_f16', 1):.4f}x f16)"
        )
    if g.get("skipped"):
        lines.append(f"  GGUF not checked: {g['skipped']}")
    return lines


def run_all(cfg: RunConfig, resume: bool = True) -> dict:
    """Every stage in order; returns eval results with the wall time of each stage."""
    prepare(cfg)  # every check before the first stage: a typo never costs a generate stage
    console.print(f"run folder: {cfg.run_dir}")
    timings = {}
    stages = [("generate", generate), ("shrink", shrink)]
    api_scores = cfg.teacher.kind == "openai" and cfg.teacher.api.top_logprobs > 0
    if (cfg.cache.use or api_scores) and cfg.train.alpha > 0:
        stages.append(("cache", build_teacher_cache))
    for name, stage in stages:
        t0 = time.perf_counter()
        stage(cfg)
        timings[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_student(cfg, resume=resume)
    timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate(cfg)
    timings["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    export(cfg)
    timings["export"] = time.perf_counter() - t0
    fsio.write_text(cfg.run_dir / "timings.json", json.dumps(timings, indent=1))
    return results
