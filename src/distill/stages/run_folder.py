"""The run folder all stages share: checks and precision at the start, the config that made it, the split."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from rich.markup import escape

from distill.core import fsio
from distill.core.answers import read_answers, up_to_sample
from distill.core.config import RunConfig
from distill.core.data import (
    Prompt,
    read_prompts,
    split_prompts,
)
from distill.core.errors import StageError, need
from distill.core.hardware import Precision, choose_precision, resolve_device
from distill.core.models import (
    ModelFacts,
)
from distill.core.progress import console
from distill.core.recipe import dump_config
from distill.core.terms import Terms, terms_of
from distill.stages.preflight import check_run

_CHECKED: dict[str, tuple[RunConfig, dict[str, Precision]]] = {}  # config JSON -> resolved, this process
_TERMS: dict[str, Terms] = {}  # config JSON -> its terms of use, read once in this process


def prepare(cfg: RunConfig) -> tuple[RunConfig, dict[str, Precision]]:
    """Check ``cfg`` against its files (``check_run``), resolve every ``dtype: auto`` and read the
    terms of use (``distill.core.terms``).

    Returns the config with concrete dtypes, and the precision chosen for each purpose (teacher,
    train, speed) with its reason, printed once per process with the teacher's licence (and an API
    teacher's provider terms). Nothing is written.
    """
    key = cfg.model_dump_json()
    if key in _CHECKED:
        return _CHECKED[key]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    facts = check_run(cfg)
    resolved, precision = resolve_precision(cfg, facts.get("teacher") or facts.get("student"))
    _CHECKED[key] = _CHECKED[resolved.model_dump_json()] = (resolved, precision)
    reasons = {p.reason for p in precision.values()}
    names = ", ".join(f"{k} {p.dtype}" for k, p in precision.items())
    console.print(f"precision: {names}" + (f" ({reasons.pop()})" if len(reasons) == 1 else ""))
    for k, p in precision.items() if len(reasons) > 1 else ():
        console.print(f"  {k}: {p.reason}")
    terms = _TERMS[key] = _TERMS[resolved.model_dump_json()] = terms_of(cfg)
    console.print(f"teacher licence: {terms.teacher}", soft_wrap=True, highlight=False, markup=False)
    if terms.student_licence is not None:
        console.print(f"student model licence: {terms.student_licence}", soft_wrap=True, highlight=False,
                      markup=False)  # fmt: skip
    if terms.provider is not None:
        console.print(f"[yellow]note:[/yellow] {escape(terms.provider)}", soft_wrap=True, highlight=False)
    return resolved, precision


def resolve_precision(cfg: RunConfig, shape: ModelFacts | None) -> tuple[RunConfig, dict[str, Precision]]:
    """``cfg`` with ``teacher.dtype``, ``train.dtype`` and ``evaluate.speed_dtype`` made concrete.

    An explicit dtype stays; ``auto`` is decided by ``distill.core.hardware.choose_precision`` on the
    device each runs on, with a matmul probe at the model's shapes (``shape``) on a CPU.
    """
    hidden, inter = (shape.hidden_size, shape.intermediate_size) if shape else (1024, 4096)
    train_dev = resolve_device("auto")
    precision = {
        "teacher": choose_precision(cfg.teacher.dtype, resolve_device(cfg.teacher.device), hidden, inter),
        "train": choose_precision(cfg.train.dtype, train_dev, hidden, inter),
        "speed": choose_precision(cfg.evaluate.speed_dtype, train_dev, hidden, inter),
    }
    resolved = cfg.model_copy(deep=True)
    resolved.teacher.dtype = precision["teacher"].dtype
    resolved.train.dtype = precision["train"].dtype
    resolved.evaluate.speed_dtype = precision["speed"].dtype
    return resolved, precision


# What each stage's output was made from: a run folder holding the output refuses a config that
# differs in these (dotted keys; a section name covers every key under it).
MADE_FROM = {
    "split.json": ("data.path", "data.format", "data.max_prompts", "data.heldout_size", "data.split_seed"),
    "answers.jsonl": (
        "data.path", "data.format", "data.max_prompts", "data.system_prompt", "data.max_prompt_tokens",
        "teacher.kind", "teacher.model", "teacher.engine", "teacher.api.base_url", "teacher.api.model",
        "teacher.api.endpoint", "teacher.api.temperature", "teacher.api.max_tokens", "teacher.api.n",
        "generate.max_new_tokens", "generate.do_sample", "generate.generation_temperature", "generate.top_p",
        "generate.seed",
    ),
    "student_init": ("teacher.model", "student"),
}  # fmt: skip


_FORCE: list[bool] = [False]


@contextmanager
def allow_config_change() -> Iterator[None]:
    """Inside, a run folder made by another config is used anyway (``--force``)."""
    _FORCE[0] = True
    try:
        yield
    finally:
        _FORCE[0] = False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(run: Path, cfg: RunConfig) -> None:
    """Refuse a run folder whose finished outputs came from a config that differs where it matters
    for them, naming the fields (``StageError``); ``allow_config_change`` lets it through."""
    old_path = run / "config.yaml"
    if _FORCE[0] or not old_path.is_file():
        return
    old, new = _flat(yaml.safe_load(old_path.read_text()) or {}), _flat(cfg.model_dump(mode="json"))
    differ: dict[str, list[str]] = {}
    for output, keys in MADE_FROM.items():
        if not (run / output).exists():
            continue
        for key in sorted(set(old) | set(new)):
            if any(key == k or key.startswith(k + ".") for k in keys) and old.get(key) != new.get(key):
                differ.setdefault(key, []).append(output)
    if differ:
        fields = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now (made {', '.join(v)})"
                           for k, v in differ.items())  # fmt: skip
        raise StageError(f"{run} was made by another config ({fields}); use another run name, or --force to "
                         "use this folder anyway")  # fmt: skip


def setup(cfg: RunConfig) -> tuple[Path, RunConfig]:
    """Check the run, resolve its precision, then make the run folder (never before: a run that
    cannot start leaves nothing behind) with the resolved config.yaml (its terms of use in comment
    lines at the top) and precision.json."""
    cfg, precision = prepare(cfg)
    run = cfg.run_dir
    check_same_run(run, cfg)
    run.mkdir(parents=True, exist_ok=True)
    terms = _TERMS.get(cfg.model_dump_json()) or terms_of(cfg)
    dump_config(cfg, run / "config.yaml", header=terms.comment())
    chosen = {k: p.as_dict() for k, p in precision.items()}
    fsio.write_text(run / "precision.json", json.dumps(chosen, indent=1))
    return run, cfg


def load_split(cfg: RunConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The (train, held-out) prompts of the run, fixed once in split.json."""
    prompts = read_prompts(cfg.data.path, cfg.data.format)
    if cfg.data.max_prompts:
        prompts = prompts[: cfg.data.max_prompts]
    split_path = cfg.run_dir / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
        by_id = {p.id: p for p in prompts}
        missing = [i for i in split["train"] + split["heldout"] if i not in by_id]
        if missing:
            raise StageError(
                f"{split_path}: {len(missing)} prompt ids (e.g. {missing[0]}) are not in the "
                "data any more; use a new run name for new data"
            )
        return [by_id[i] for i in split["train"]], [by_id[i] for i in split["heldout"]]
    train_p, held = split_prompts(prompts, cfg.data.heldout_size, cfg.data.split_seed)
    split = {"train": [p.id for p in train_p], "heldout": [p.id for p in held]}
    fsio.write_text(split_path, json.dumps(split))
    return train_p, held


def run_answers(cfg: RunConfig, run: Path) -> dict[str, dict]:
    """The run's answers.jsonl, as the config asks for it: with a local teacher each prompt's first
    ``1 + generate.extra_samples + generate.resample`` answers (a file generated with more is read as
    asked; the filter keeps only the first resampled answer that passes); with an API teacher all of
    them (its ``teacher.api.n``)."""
    answers = read_answers(need(run / "answers.jsonl", "generate"))
    if cfg.teacher.kind == "openai":
        return answers
    return up_to_sample(answers, cfg.generate.extra_samples + cfg.generate.resample)
