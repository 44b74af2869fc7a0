"""Command line: one subcommand per pipeline stage, each a thin call into distill.pipeline."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from distill import pipeline
from distill.core import fsio, interrupt, runlog
from distill.core.config import ConfigError, RunConfig
from distill.core.data import DataError
from distill.core.errors import TrainingError
from distill.core.models import ModelError, ModelNotFoundError, cache_root
from distill.core.progress import console
from distill.core.recipe import load_config_with_notes
from distill.export.gguf import GGUFExportError
from distill.teacher.api_client import ApiError
from distill.teacher.cache import CacheError

app = typer.Typer(
    help="Distil a large language model (teacher) into a smaller one (student).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class _Output:
    """The app's own options, set by ``main`` before a command runs."""

    verbose: bool = False  # every library's logging and progress bars on the console too


_OUTPUT = _Output()


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="show other libraries' logging, warnings and progress bars on the console too "
            "(without it they go to the run folder's logs/run.log)",
        ),
    ] = False,
) -> None:
    """Distil a large language model (teacher) into a smaller one (student)."""
    _OUTPUT.verbose = verbose


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="recipe YAML; default: the embedded default recipe"),
]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config key, e.g. --set train.lr=1e-4 (repeatable)"),
]


ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="use a run folder whose outputs another config made (named when refused)"),
]


USER_ERRORS = (
    ApiError,
    CacheError,
    ConfigError,
    DataError,
    GGUFExportError,
    ModelError,
    ModelNotFoundError,
    pipeline.StageError,
    TrainingError,
)


def _config(config: Path | None, overrides: list[str] | None) -> RunConfig:
    """The config, or exit 2 with the error; each recipe value the teacher signal turned off is
    printed as a note."""
    cfg, notes = _config_and_notes(config, overrides)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True, highlight=False)
    return cfg


def _config_and_notes(config: Path | None, overrides: list[str] | None) -> tuple[RunConfig, list[str]]:
    try:
        return load_config_with_notes(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


# What a run folder holds before any stage has finished anything: a failed start removes it.
_START_FILES = {"config.yaml", "precision.json", "split.json", "logs"}


def _crash_log(exc: BaseException) -> Path:
    """Write the traceback of an unexpected error to a log file; returns its path."""
    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"crash-{stamp}-{os.getpid()}.log"
    path.write_text(f"distill {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc)))
    return path


def _call(fn, cfg: RunConfig, *args, force: bool = False, **kwargs):
    """Run a stage: a user error prints one line and exits 2; an unexpected one prints a short
    message and the path of a log with its traceback, and exits 1. A run folder this call made
    is removed again if the stage failed before finishing anything in it. Other libraries' output
    goes to the run folder's logs/run.log (and the console too with --verbose)."""
    made = [p for p in (cfg.run_dir, *cfg.run_dir.parents) if not p.exists()]  # folders this call may make
    log = cfg.run_dir / "logs" / "run.log"
    try:
        with (
            runlog.run_output(log, verbose=_OUTPUT.verbose),
            interrupt.stop_at_safe_points(),
            pipeline.allow_config_change() if force else nullcontext(),
        ):
            return fn(cfg, *args, **kwargs)
    except interrupt.Stopped as exc:
        _remove_unstarted(cfg.run_dir, made)
        console.print(f"[yellow]{exc}[/yellow]", soft_wrap=True)
        raise typer.Exit(128 + int(exc.signum)) from None  # 130 for SIGINT, 143 for SIGTERM
    except USER_ERRORS as exc:
        _remove_unstarted(cfg.run_dir, made)
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _remove_unstarted(cfg.run_dir, made)
        console.print("[red]interrupted[/red]: finished work is kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - a bug or an environment fault: keep the traceback in a file
        _remove_unstarted(cfg.run_dir, made)
        fault = fsio.write_fault(exc)  # a full disk, a quota, a forbidden folder: the user's to fix
        if fault is not None:
            where = fault.filename or f"a file under {cfg.run_dir}"
            msg = (f"could not write {where}: {fault.strerror}. Free some space (or fix the permissions) "
                   "and run the same command again: finished work is kept")  # fmt: skip
            console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
            raise typer.Exit(2) from None
        log = _crash_log(exc)
        console.print(f"[red]unexpected error:[/red] {type(exc).__name__}: {str(exc)[:300]}", soft_wrap=True)
        console.print(f"the traceback is in {log}; please include it in a bug report", soft_wrap=True)
        raise typer.Exit(1) from None


def _remove_unstarted(run_dir: Path, made: list[Path]) -> None:
    if made and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= _START_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in made[1:]:  # runs_dir too, when this call made it and it is empty
            try:
                parent.rmdir()
            except OSError:
                break


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="recipe YAML; omit for the default")] = None,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option(help="ignore training checkpoints")] = False,
    force: ForceOpt = False,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="the teacher: a bundled name, a Hugging Face folder or a .gguf file; with "
            "--api-base, the model name the server expects"
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="shrink (a student cut from the teacher), or a model to start from: a bundled "
            "name, a Hugging Face folder or a .gguf file"
        ),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="your prompts: a JSONL, TXT, CSV or Parquet file")] = None,
    api_base: Annotated[
        str | None, typer.Option(help="an OpenAI-compatible endpoint, up to /v1, that serves --teacher")
    ] = None,
) -> None:
    """All stages: generate -> shrink -> train -> evaluate -> export.

    --teacher, --student, --data and --api-base stand for --set overrides (README: "Your own
    teacher and prompts"); a flag and a --set naming the same key are refused."""
    from rich.markup import escape

    from distill.core.recipe import quick_start_overrides

    try:
        overrides = quick_start_overrides(
            set_, teacher=teacher, student=student, data=data, api_base=api_base
        )
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    _call(pipeline.run_all, _config(config, overrides), resume=not fresh, force=force)


@app.command()
def generate(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Teacher answers for every prompt (resumable) -> answers.jsonl."""
    _call(pipeline.generate, _config(config, set_), force=force)


@app.command()
def shrink(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Make the untrained student by keeping a subset of the teacher's layers -> student_init/."""
    _call(pipeline.shrink, _config(config, set_), force=force)


@app.command()
def cache(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verify: Annotated[bool, typer.Option(help="only check every shard against its checksum")] = False,
    force: ForceOpt = False,
) -> None:
    """Score the training sequences with the teacher once -> teacher_cache/ (resumable)."""
    cfg = _config(config, set_)
    if not verify:
        _call(pipeline.build_teacher_cache, cfg, force=force)
        return
    problems = _call(pipeline.verify_teacher_cache, cfg)  # reads only
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
    force: ForceOpt = False,
) -> None:
    """Distil the teacher into the student -> student/."""
    _call(pipeline.train_student, _config(config, set_), resume=resume, force=force)


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Teacher vs untrained and trained student on held-out prompts -> eval.json."""
    _call(pipeline.evaluate, _config(config, set_), force=force)


@app.command()
def export(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    format_: Annotated[
        list[str] | None,
        typer.Option("--format", help="hf or gguf (repeatable); default: export.formats (both)"),
    ] = None,
) -> None:
    """The student as a Hugging Face folder and GGUF files, checked, with a model card -> export/."""
    overrides = list(set_ or [])
    if format_:
        overrides.append(f"export.formats=[{','.join(format_)}]")
    _call(pipeline.export, _config(config, overrides), force=force)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run folder with an evaluation (eval.json)")],
    price_per_hour: Annotated[
        float | None, typer.Option(help="USD an hour of the serving machine: adds cost per million tokens")
    ] = None,
) -> None:
    """The run's report again from its folder -> report/report.html (self-contained) and report.md."""
    from distill.evaluate.report import ReportError, write_report

    if price_per_hour is not None and price_per_hour <= 0:
        console.print(f"[red]error:[/red] --price-per-hour must be above 0, not {price_per_hour}")
        raise typer.Exit(2)
    try:
        page = write_report(run_dir, price_per_hour=price_per_hour)
    except (ReportError, json.JSONDecodeError, OSError) as exc:
        console.print(f"[red]error:[/red] {_reading_error(exc, run_dir)}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"report: {page}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more evaluated run folders")],
    out: Annotated[Path, typer.Option(help="folder for compare.html, .md, .png, .json")] = Path(
        "runs/compare"
    ),
    metric: Annotated[
        str, typer.Option(help="quality axis: top1_agreement, kl, rouge_l, reference_accuracy")
    ] = ("top1_agreement"),
) -> None:
    """Several runs' students in one table and one quality-against-speed plot."""
    from distill.evaluate.compare import CompareError, compare_runs

    if metric not in ("top1_agreement", "kl", "rouge_l", "reference_accuracy"):
        console.print(
            f"[red]error:[/red] --metric {metric!r}: use top1_agreement, kl, rouge_l or reference_accuracy"
        )
        raise typer.Exit(2)
    try:
        page = compare_runs(runs, out, y=metric)
    except (CompareError, json.JSONDecodeError, OSError) as exc:
        console.print(f"[red]error:[/red] {_reading_error(exc, None)}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"comparison: {page}")


def _reading_error(exc: Exception, run_dir: Path | None) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"a file of the run is not valid JSON ({exc}); run `distill evaluate` again"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


@app.command()
def audit(
    teacher: Annotated[str, typer.Argument(help="teacher: a folder, a .gguf file or a bundled name")],
    student: Annotated[str, typer.Argument(help="student: the same kinds")],
    trust_remote_code: Annotated[bool, typer.Option(help="let the models' own tokenizer code run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the audit as JSON")] = False,
) -> None:
    """May the two models' logits be compared id by id? The tokenizer audit, and the valid methods."""
    from distill.teacher.audit import audit_models

    try:
        result = audit_models(teacher, student, trust_remote_code=trust_remote_code)
    except (*USER_ERRORS, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    for line in result.lines():
        console.print(line, soft_wrap=True, markup=False)


@app.command("show-config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults filled in) as YAML; a recipe value the teacher signal
    turned off is named in a comment line above it."""
    import yaml

    cfg, notes = _config_and_notes(config, set_)
    for note in notes:  # comments: the output stays a recipe that loads as it is
        print(f"# note: {note}")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":  # pragma: no cover
    app()
