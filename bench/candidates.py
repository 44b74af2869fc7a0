"""What bench/quality.py, bench/choice.py and bench/curve.py share: a candidate run folder seeded from
a source run, trained in a process of its own, its result read back.

Each candidate starts from the source run's teacher answers and untrained student (copied, so the
source is never written to), trains with the overrides it is given, and prints one ``RESULT {json}``
line; a fresh process per candidate keeps one candidate's memory and compiled kernels from another's
timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The embedded prompt set before bench/choice.py's ninth round widened it: default.jsonl's first rows,
# large.jsonl's too. Candidates and curve series of the rounds before train on these rows.
FIRST_ROWS = 638


def seed_run(run: Path, source: Path, files: tuple[str, ...] = ("answers.jsonl",)) -> None:
    """An empty ``run`` folder holding ``files`` and ``student_init/`` of ``source``."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for f in files:
        shutil.copy(source / f, run / f)
    shutil.copytree(source / "student_init", run / "student_init")


def last_elapsed(metrics: Path) -> float | None:
    """``elapsed_s`` of the last step in a run's metrics.jsonl: the training time its budget counted
    (loading the models and the final save are outside it); None for a run that did not record it."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return rows[-1].get("elapsed_s") if rows else None


def run_child(script: str, args: list[str], what: str) -> dict:
    """``python script args`` in its own process; the dict of its ``RESULT`` line, or exit naming
    ``what`` failed with the end of its stderr."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def train_candidate(overrides: list[str]):
    """The default recipe with ``overrides``, trained in its (seeded) run folder: (config, the run's
    train_summary.json, training seconds)."""
    from distill import pipeline
    from distill.core.recipe import load_config

    cfg, _ = pipeline.prepare(load_config(None, overrides))
    pipeline.shrink(cfg)  # the source run's student_init is in place: nothing to do
    t0 = time.perf_counter()
    pipeline.train_student(cfg, resume=False)
    train_s = time.perf_counter() - t0
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    return cfg, summary, train_s


def student_and_teacher(cfg, run: Path):
    """The run's trained student and the fp32 teacher (the reference, as in eval.json), and the
    tokenizer they share."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.core.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model)
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    return student, teacher, tok
