"""train: distil the teacher into the untrained student -> student/ (resumable from checkpoints)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core import fsio
from distill.core.config import RunConfig
from distill.core.errors import StageError, need
from distill.core.progress import console
from distill.stages.run_folder import load_split, run_answers, setup
from distill.student.lora import add_lora
from distill.student.prune import layer_map
from distill.teacher.examples import kept_examples, kept_text_examples
from distill.teacher.factory import (
    other_tokenizer,
    training_signal,
)
from distill.teacher.signal import LiveTeacher
from distill.train.checkpoint import check_train_inputs
from distill.train.heal import heal
from distill.train.loop import train
from distill.train.step import attach_hidden_projection, detach_hidden_projection


def train_student(cfg: RunConfig, resume: bool = True) -> Path:
    """Distil the teacher into student_init -> student/ (checkpoints let a rerun resume)."""
    run, cfg = setup(cfg)
    init = need(run / "student_init", "shrink")
    answers = run_answers(cfg, run)
    train_p, _ = load_split(cfg)
    tok = AutoTokenizer.from_pretrained(init)
    t_tok = other_tokenizer(cfg, tok)  # the teacher's, when the student has its own
    if t_tok is not None:
        kept_text, filter_report = kept_text_examples(cfg, tok, train_p, answers)
        kept = [(ex, rec) for ex, rec, _ in kept_text]
    else:
        kept, filter_report = kept_examples(cfg, tok, train_p, answers)
    examples = [ex for ex, _ in kept]
    if not examples:
        raise StageError(f"no training answers left after the filter ({filter_report}); loosen `filter`")
    student = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    signal = training_signal(cfg, run, tok, t_tok, kept, kept_text if t_tok is not None else None,
                             layer_map=partial(layer_map, init, student))  # fmt: skip
    teacher, grader, alignment, source = signal.teacher, signal.grader, signal.alignment, signal.source
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
    source += signal.grader_source
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
        _, held = load_split(cfg)
        healed = heal(cfg, run, held, student, live, tok, acc, resume)
    check_train_inputs(run, resume, acc.is_main_process)
    summary = train(student, teacher, examples, signal.train, run, pad_id=tok.pad_token_id,
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
    acc.end_training()  # trackers closed; the process group destroyed, so no process aborts at exit
    return out
