"""evaluate: teacher, untrained student and student on the held-out prompts -> eval.json, report/."""

from __future__ import annotations

import json

import torch

from distill.core import fsio
from distill.core.answers import read_answers
from distill.core.config import RunConfig
from distill.core.errors import need
from distill.core.fsio import write_json
from distill.core.models import load_tokenizer, resolve_model_dir
from distill.core.progress import console
from distill.evaluate.heldout import score_heldout
from distill.evaluate.intervals import summarised_warnings
from distill.evaluate.metrics import results_table
from distill.evaluate.report import write_report
from distill.stages.run_folder import load_split, setup
from distill.teacher.factory import load_teacher, tokenizer_ref


def evaluate(cfg: RunConfig) -> dict:
    """Teacher, untrained student and student on the held-out prompts -> eval.json.

    An API teacher with no local copy (``teacher.model: null``) is scored by its stored
    answers only: no KL or top-1 agreement, and speed-ups are not measured.
    """
    run, cfg = setup(cfg)
    answers = read_answers(need(run / "answers.jsonl", "generate"))
    _, held = load_split(cfg)
    tok = load_tokenizer(tokenizer_ref(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
    teacher = None
    if cfg.teacher.model:  # fp32: the reference the students' KL is measured against
        teacher = load_teacher(cfg, torch.float32)
    folders = {
        "teacher": resolve_model_dir(cfg.teacher.model) if teacher is not None else None,
        "untrained_student": need(run / "student_init", "shrink"),
        "student": need(run / "student", "train"),
    }
    gen_summary = run / "generate_summary.json"
    api_total = json.loads(gen_summary.read_text())["total"] if gen_summary.is_file() else None
    precision = json.loads((run / "precision.json").read_text())  # chosen at this stage's start
    results, per_prompt, outputs, task_answers = score_heldout(cfg, teacher, tok, folders, held, answers,
                                                               precision, api_total)  # fmt: skip
    intervals, task_results = results["intervals"], results["tasks"]
    prompts = {p.id: {"messages": p.messages, "reference": p.reference} for p in held}
    write_json(run / "eval_prompts.json", {"prompts": prompts, "models": per_prompt})
    write_json(run / "eval.json", results)
    lines = [json.dumps(o, ensure_ascii=False) + "\n" for o in outputs]
    fsio.write_text(run / "eval_answers.jsonl", "".join(lines))
    lines = [json.dumps(o, ensure_ascii=False) + "\n" for o in task_answers]
    fsio.write_text(run / "eval_tasks.jsonl", "".join(lines))
    console.print(results_table({k: v for k, v in results.items() if k in folders}))
    for name, task in task_results.items():
        accuracy = {m: ci["reference_accuracy"]["value"] for m, ci in task["intervals"]["models"].items()}
        console.print(f"task {name} ({task['items']} items): accuracy "
                      + ", ".join(f"{m} {v:.3f}" for m, v in accuracy.items()))  # fmt: skip
    task_warnings = [w for t in task_results.values() for w in t["intervals"]["warnings"]]
    for warning in summarised_warnings(intervals["warnings"] + task_warnings):
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    console.print(f"report with plots: {write_report(run, results)}")
    return results
