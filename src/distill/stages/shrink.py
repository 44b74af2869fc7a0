"""shrink: the untrained student -> student_init/ (shrunk from the teacher, or a given model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.core import fsio
from distill.core.answers import read_answers, up_to_sample
from distill.core.config import RunConfig
from distill.core.errors import StageError
from distill.core.hardware import DTYPES
from distill.core.models import (
    count_params,
    load_model,
    load_tokenizer,
)
from distill.core.progress import console
from distill.stages.run_folder import load_split, setup
from distill.student.build import choose_student
from distill.teacher.examples import training_examples
from distill.teacher.factory import tokenizer_ref


def shrink(cfg: RunConfig) -> Path:
    """The untrained student -> student_init/ (shrunk teacher, or a given model)."""
    run, cfg = setup(cfg)
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
        # each prompt's first answer: the same student however many samples were generated
        first = up_to_sample(read_answers(answers_path), 0)
        calib = training_examples(cfg, tok, train_p, first)[: s.calibration_samples]
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
