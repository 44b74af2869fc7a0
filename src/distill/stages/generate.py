"""generate: the teacher's answer to every prompt (local model or API, resumable) -> answers.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import GenerationConfig

from distill.core import fsio
from distill.core.answers import read_log, write_records
from distill.core.config import RunConfig
from distill.core.data import (
    Prompt,
    prompt_token_ids,
    with_system_prompt,
)
from distill.core.errors import StageError
from distill.core.generation import eos_ids
from distill.core.hardware import DTYPES
from distill.core.models import (
    load_tokenizer,
    resolve_gguf,
    resolve_model_dir,
)
from distill.core.progress import console
from distill.stages.run_folder import load_split, setup
from distill.teacher.api import api_signal
from distill.teacher.factory import load_teacher, tokenizer_ref
from distill.teacher.generate import LlamaCppEngine, generate_answers, resample_answers


def generate(cfg: RunConfig) -> Path:
    """Teacher answers for every prompt (train and held-out) -> answers.jsonl."""
    run, cfg = setup(cfg)
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
        model = load_teacher(cfg, DTYPES[cfg.teacher.dtype])
    out = run / "answers.jsonl"
    answers = generate_answers(
        model, tok, train_p + held, out, cfg.generate, engine=engine,
        system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
        sampled={p.id for p in train_p},
    )  # fmt: skip
    if cfg.generate.resample:
        answers = resample_answers(
            model, tok, train_p, out, cfg.generate, cfg.filter, engine=engine,
            system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
        )  # fmt: skip
    stops = sum(a["finish_reason"] == "stop" for a in answers.values())
    extra = sum(0 < a.get("sample", 0) <= cfg.generate.extra_samples for a in answers.values())
    again = sum(a.get("sample", 0) > cfg.generate.extra_samples for a in answers.values())
    also = f", {extra} of them sampled beside the first answer" if extra else ""
    also += f", {again} drawn again by resampling" if again else ""
    console.print(f"{len(answers)} teacher answers in {out} ({stops} ended with eos{also})")
    return out


def _generate_api(cfg: RunConfig, prompts: list[Prompt]) -> Path:
    """Answers from an OpenAI-compatible endpoint: api_log.jsonl (every outcome, append-only),
    then answers.jsonl (the successes in our tokenizer) and generate_summary.json."""
    from distill.teacher.api import generate_api_answers, log_totals, training_answers

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
    signal = api_signal(cfg, mapping)
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
