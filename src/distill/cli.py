"""Command line: one subcommand per pipeline stage, each a thin call into distill.pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from distill import pipeline
from distill.api import ApiError
from distill.cache import CacheError
from distill.config import ConfigError, RunConfig, load_config
from distill.data import DataError
from distill.models import ModelNotFoundError
from distill.progress import console
from distill.train import TrainingError

app = typer.Typer(
    help="Distil a large language model (teacher) into a smaller one (student).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="recipe YAML; default: the embedded default recipe"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config key, e.g. --set train.lr=1e-4 (repeatable)"),
]
USER_ERRORS = (
    ApiError,
    CacheError,
    ConfigError,
    DataError,
    ModelNotFoundError,
    pipeline.StageError,
    TrainingError,
)


def _config(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


def _call(fn, *args, **kwargs):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="recipe YAML; omit for the default")] = None,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option(help="ignore training checkpoints")] = False,
) -> None:
    """All stages: generate -> shrink -> train -> evaluate -> export."""
    cfg = _config(config, set_)
    console.print(f"run folder: {cfg.run_dir}")
    _call(pipeline.run_all, cfg, resume=not fresh)


@app.command()
def generate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Teacher answers for every prompt (resumable) -> answers.jsonl."""
    _call(pipeline.generate, _config(config, set_))


@app.command()
def shrink(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Make the untrained student by keeping a subset of the teacher's layers -> student_init/."""
    _call(pipeline.shrink, _config(config, set_))


@app.command()
def cache(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verify: Annotated[bool, typer.Option(help="only check every shard against its checksum")] = False,
) -> None:
    """Score the training sequences with the teacher once -> teacher_cache/ (resumable)."""
    cfg = _config(config, set_)
    if not verify:
        _call(pipeline.build_teacher_cache, cfg)
        return
    problems = _call(pipeline.verify_teacher_cache, cfg)
    for p in problems:
        console.print(f"[red]{p}[/red]")
    if problems:
        raise typer.Exit(1)
    console.print("every shard matches its checksum")


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = True,
) -> None:
    """Distil the teacher into the student -> student/."""
    _call(pipeline.train_student, _config(config, set_), resume=resume)


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Teacher vs untrained and trained student on held-out prompts -> eval.json."""
    _call(pipeline.evaluate, _config(config, set_))


@app.command()
def export(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The student as a plain Hugging Face folder with a model card -> export/."""
    _call(pipeline.export, _config(config, set_))


@app.command("show-config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults filled in) as YAML."""
    import yaml

    print(yaml.safe_dump(_config(config, set_).model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":  # pragma: no cover
    app()
