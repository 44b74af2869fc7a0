"""The pipeline stages as plain functions over one run folder.

Each stage reads the files earlier stages wrote under ``runs/<name>/`` and writes its own:

    config.yaml      resolved config           (every stage)
    split.json       train / held-out ids      (prepare)
    answers.jsonl    teacher answers           (generate)
    student_init/    untrained student         (shrink)
    teacher_cache/   top-k teacher log-probs   (cache; only when cache.use)
    student/         trained student           (train; checkpoints/ and metrics.jsonl beside it)
    eval.json        teacher vs students       (evaluate; eval_answers.jsonl)
    export/          HF folder + model card    (export)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cache import CachedTeacher, CacheMeta, build_cache, tokenizer_hash, verify_cache, weights_hash
from distill.config import LoraConfig, RunConfig, dump_config
from distill.data import Prompt, make_example, prompt_token_ids, read_prompts, split_prompts
from distill.evaluate import compare_speed, evaluate_model, results_table
from distill.export import export_student
from distill.generate import generate_answers, read_answers
from distill.models import (
    evenly_spaced_layers,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    shrink_layers,
)
from distill.progress import console
from distill.teacher import LiveTeacher
from distill.train import train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StageError(RuntimeError):
    """A stage cannot start: an earlier stage's output is missing."""


def _setup(cfg: RunConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    return run


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
    split_path.write_text(json.dumps({"train": [p.id for p in train_p], "heldout": [p.id for p in held]}))
    return train_p, held


def generate(cfg: RunConfig) -> Path:
    """Teacher answers for every prompt (train and held-out) -> answers.jsonl."""
    run = _setup(cfg)
    train_p, held = load_split(cfg)
    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    model = load_model(cfg.teacher.model, dtype=DTYPES[cfg.teacher.dtype],
                       trust_remote_code=cfg.teacher.trust_remote_code)  # fmt: skip
    out = run / "answers.jsonl"
    answers = generate_answers(
        model, tok, train_p + held, out, cfg.generate,
        system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
    )  # fmt: skip
    stops = sum(a["finish_reason"] == "stop" for a in answers.values())
    console.print(f"{len(answers)} teacher answers in {out} ({stops} ended with eos)")
    return out


def shrink(cfg: RunConfig) -> Path:
    """The untrained student -> student_init/ (shrunk teacher, or a given model)."""
    run = _setup(cfg)
    out = run / "student_init"
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    if cfg.student.init == "shrink":
        teacher = load_model(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
        n = teacher.config.num_hidden_layers
        layers = cfg.student.layers or evenly_spaced_layers(n, cfg.student.num_layers)
        student = shrink_layers(teacher, layers)
        console.print(f"student keeps teacher layers {layers} of {n}")
    else:
        student = load_model(cfg.student.model, trust_remote_code=cfg.teacher.trust_remote_code)
        s_tok = load_tokenizer(cfg.student.model)
        if s_tok.get_vocab() != tok.get_vocab():
            raise StageError(
                f"student {cfg.student.model} has a different tokenizer from teacher "
                f"{cfg.teacher.model}; token-level distillation needs the same vocabulary"
            )
    tmp = out.with_name("student_init.tmp")
    student.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def training_examples(cfg: RunConfig, tok, prompts: list[Prompt], answers: dict[str, dict]) -> list:
    """(ids, answer mask) pairs for every prompt that has a teacher answer."""
    out = []
    for p in prompts:
        if p.id in answers and answers[p.id]["token_ids"]:
            ids = prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                   max_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
            out.append(make_example(ids, answers[p.id]["token_ids"], cfg.train.max_seq_len))
    return out


def _cache_expectations(cfg: RunConfig, tok) -> dict:
    return {
        "teacher": cfg.teacher.model,
        "teacher_weights_hash": weights_hash(resolve_model_dir(cfg.teacher.model)),
        "tokenizer_hash": tokenizer_hash(tok),
        "k": cfg.cache.k,
        "scoring_temperature": cfg.cache.scoring_temperature,
    }


def build_teacher_cache(cfg: RunConfig) -> Path:
    """Score the training sequences with the teacher once -> teacher_cache/ (resumable)."""
    run = _setup(cfg)
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    train_p, _ = load_split(cfg)
    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    examples = training_examples(cfg, tok, train_p, answers)
    model = load_model(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    expected = _cache_expectations(cfg, tok)
    meta = CacheMeta(
        **expected, vocab_size=len(tok), id_dtype="uint16" if len(tok) <= 65536 else "int32",
        logprob_dtype="float16", samples_per_shard=cfg.cache.samples_per_shard, num_samples=len(examples),
    )  # fmt: skip
    out = build_cache(model, examples, run / "teacher_cache", meta, pad_id=tok.pad_token_id,
                      batch_size=cfg.cache.batch_size)  # fmt: skip
    console.print(f"teacher cache for {len(examples)} samples in {out}")
    return out


def verify_teacher_cache(cfg: RunConfig) -> list[str]:
    """Check every shard of the run's cache against its checksum; returns the problems."""
    return verify_cache(_need(cfg.run_dir / "teacher_cache", "cache"))


def train_student(cfg: RunConfig, resume: bool = True) -> Path:
    """Distil the teacher into student_init -> student/ (checkpoints let a rerun resume)."""
    run = _setup(cfg)
    init = _need(run / "student_init", "shrink")
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    train_p, _ = load_split(cfg)
    tok = AutoTokenizer.from_pretrained(init)
    examples = training_examples(cfg, tok, train_p, answers)
    student = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    teacher = None
    if cfg.train.alpha > 0 and cfg.cache.use:
        cache_dir = _need(run / "teacher_cache", "cache")
        teacher = CachedTeacher(cache_dir, _cache_expectations(cfg, tok), examples, tail=cfg.cache.tail)
    elif cfg.train.alpha > 0:
        tdtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        teacher = LiveTeacher(load_model(cfg.teacher.model, dtype=tdtype,
                                         trust_remote_code=cfg.teacher.trust_remote_code))  # fmt: skip
    source = "cached top-k teacher log-probs" if cfg.cache.use else "live teacher logits"
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.is_main_process:
        console.print(
            f"training on {len(examples)} teacher answers, {source}, {acc.num_processes} process(es)"
        )
    if teacher is not None and isinstance(teacher, LiveTeacher):
        teacher.model.to(acc.device)
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    if cfg.train.lora:
        student = add_lora(student, cfg.train.lora)
    summary = train(student, teacher, examples, cfg.train, run, pad_id=tok.pad_token_id,
                    vocab_size=len(tok), resume=resume, accelerator=acc)  # fmt: skip
    out = run / "student"
    if acc.is_main_process:
        if cfg.train.lora:
            student = student.merge_and_unload()  # a plain model: the export needs no peft
        student.config.use_cache = True
        tmp = run / "student.tmp"
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        (run / "train_summary.json").write_text(json.dumps(summary, indent=1))
        console.print(f"trained {summary['steps']} steps in {summary['seconds']:.0f}s -> {out}")
    acc.wait_for_everyone()
    return out


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
    """Teacher, untrained student and student on the held-out prompts -> eval.json."""
    run = _setup(cfg)
    answers = read_answers(_need(run / "answers.jsonl", "generate"))
    _, held = load_split(cfg)
    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    ids = {p.id: prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                  max_tokens=cfg.data.max_prompt_tokens) for p in held}  # fmt: skip
    teacher = load_model(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    candidates = {
        "teacher": (teacher, resolve_model_dir(cfg.teacher.model)),
        "untrained_student": (None, _need(run / "student_init", "shrink")),
        "student": (None, _need(run / "student", "train")),
    }
    results, outputs, models = {}, [], {}
    for name, (model, folder) in candidates.items():
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        res, outs = evaluate_model(
            name, model, teacher, tok, held, ids, answers, cfg.evaluate, weights_dir=folder,
            max_seq_len=cfg.train.max_seq_len, reference_answers=name == "teacher",
        )  # fmt: skip
        results[name], outputs, models[name] = res, outputs + outs, model
    console.print("[dim]measuring generation speed, the models in turn...[/dim]")
    speed_prompts = [ids[p.id] for p in held[:4]]
    speeds = compare_speed(models, tok, speed_prompts, cfg.evaluate, DTYPES[cfg.evaluate.speed_dtype])
    for name, figures in speeds.items():
        results[name].update(figures)
    t, s, u = results["teacher"], results["student"], results["untrained_student"]
    results["summary"] = {
        "heldout_prompts": len(held),
        "speedup_batch1": s["tokens_per_s_batch1"] / t["tokens_per_s_batch1"],
        "speedup_batched": s["tokens_per_s_batched"] / t["tokens_per_s_batched"],
        "size_ratio": s["params"] / t["params"],
        "kl_untrained_over_trained": u["kl"] / max(s["kl"], 1e-12),
    }
    (run / "eval.json").write_text(json.dumps(results, indent=1))
    with (run / "eval_answers.jsonl").open("w") as f:
        for o in outputs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
    console.print(results_table({k: v for k, v in results.items() if k != "summary"}))
    return results


def export(cfg: RunConfig) -> Path:
    """The trained student as a plain Hugging Face folder with a model card -> export/."""
    run = _setup(cfg)
    eval_path = run / "eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    out = export_student(_need(run / "student", "train"), run / "export", cfg, results)
    console.print(f"exported {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return out


def run_all(cfg: RunConfig, resume: bool = True) -> dict:
    """Every stage in order; returns eval results with the wall time of each stage."""
    timings = {}
    stages = [("generate", generate), ("shrink", shrink)]
    if cfg.cache.use and cfg.train.alpha > 0:
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
    (cfg.run_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    return results
