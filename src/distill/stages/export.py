"""export: the trained student as a Hugging Face folder, GGUF files and a model card -> export/."""

from __future__ import annotations

import json
from pathlib import Path

from distill.core.answers import read_answers
from distill.core.config import RunConfig
from distill.core.errors import need
from distill.core.fsio import write_json
from distill.core.models import load_tokenizer, resolve_gguf
from distill.core.progress import console
from distill.core.terms import read_terms
from distill.export.folder import check_lines, check_rows, export_student
from distill.stages.run_folder import load_split, setup
from distill.teacher.factory import other_tokenizer


def export(cfg: RunConfig) -> Path:
    """The trained student as a plain Hugging Face folder with a model card -> export/."""
    run, cfg = setup(cfg)
    student_dir = need(run / "student", "train")
    eval_path = run / "eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    rows = None
    if cfg.export.check_prompts:  # the first held-out prompts, read by the HF folder and the GGUF files
        rows = []
        if (run / "answers.jsonl").is_file():
            answers = read_answers(run / "answers.jsonl")
            _, held = load_split(cfg)
            tok = load_tokenizer(str(student_dir))
            rows = check_rows(cfg, tok, held, answers, own=other_tokenizer(cfg, tok) is not None)
    teacher_gguf = resolve_gguf(cfg.teacher.model) if cfg.teacher.model else None
    terms = read_terms(run / "config.yaml")  # as the run recorded them when it started
    out, check = export_student(student_dir, run / "export", cfg, results, rows, teacher_gguf, terms)
    if check is not None:
        write_json(run / "export_check.json", check)
        if results is not None:
            results["export_check"] = check
            write_json(eval_path, results)
    written = ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".gguf", ".safetensors")))
    console.print(f"exported {out}: {written}")
    for line in check_lines(check):
        console.print(line)
    return out
