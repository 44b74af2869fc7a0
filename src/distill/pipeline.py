"""The pipeline: every stage in order over one run folder, and the stage functions by name.

Each stage (``distill.stages``) reads the files earlier stages wrote under ``runs/<name>/`` and
writes its own:

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

import time

from distill.core.config import RunConfig
from distill.core.errors import StageError
from distill.core.fsio import write_json
from distill.core.progress import console
from distill.stages.cache import build_teacher_cache, verify_teacher_cache
from distill.stages.evaluate import evaluate
from distill.stages.export import export
from distill.stages.generate import generate
from distill.stages.run_folder import allow_config_change, load_split, prepare
from distill.stages.shrink import shrink
from distill.stages.train import train_student

__all__ = [
    "StageError",
    "allow_config_change",
    "build_teacher_cache",
    "evaluate",
    "export",
    "generate",
    "load_split",
    "prepare",
    "run_all",
    "shrink",
    "train_student",
    "verify_teacher_cache",
]


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
    write_json(cfg.run_dir / "timings.json", timings)
    return results
