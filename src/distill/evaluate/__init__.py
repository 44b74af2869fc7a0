"""Evaluation: fidelity, quality, speed and size with intervals; tasks; the report; run comparison.

Public names, by module:

    metrics: evaluate_model, compare_speed, peak_memory, forced_metrics, results_table,
        matches_reference, METRICS
    heldout: score_heldout
    intervals: quality_intervals, bootstrap
    tasks: evaluate_tasks, load_task, run_program, BUILTIN
    report: write_report, environment
    compare: compare_runs, CompareError
"""

from distill.evaluate.compare import CompareError, compare_runs
from distill.evaluate.heldout import score_heldout
from distill.evaluate.intervals import bootstrap, quality_intervals
from distill.evaluate.metrics import (
    METRICS,
    compare_speed,
    evaluate_model,
    forced_metrics,
    matches_reference,
    peak_memory,
    results_table,
)
from distill.evaluate.report import environment, write_report
from distill.evaluate.tasks import BUILTIN, evaluate_tasks, load_task, run_program

__all__ = [
    "BUILTIN",
    "CompareError",
    "METRICS",
    "bootstrap",
    "compare_runs",
    "compare_speed",
    "environment",
    "evaluate_model",
    "evaluate_tasks",
    "forced_metrics",
    "load_task",
    "matches_reference",
    "peak_memory",
    "quality_intervals",
    "results_table",
    "run_program",
    "score_heldout",
    "write_report",
]
