"""Errors a user can cause and fix, shown without a traceback (exit code 2)."""

from __future__ import annotations

from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot start: an earlier stage's output is missing."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit)."""


def need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run `distill {stage}` for this run first")
    return path
