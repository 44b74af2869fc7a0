"""The bad-input catalogue (tests/bad_inputs/catalogue.yaml): every case is refused by `distill run`
with exit code 2, one message naming the file, line or field, no traceback, no run folder, and the
input left as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

from conftest import tiny_recipe

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "catalogue.yaml").read_text())


def _digest(path: Path) -> str | None:
    if path.is_dir():
        return "".join(_digest(p) or "" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _name(case: dict) -> str:
    kind = next(k for k in ("prompts", "teacher", "recipe", "set") if k in case)
    return f"{kind}:{case[kind] if kind != 'set' else ','.join(case[kind])}"


def test_every_catalogue_file_is_used():
    named = {c[k] for c in CASES for k in ("prompts", "teacher", "recipe") if k in c}
    assert {p.name for p in HERE.iterdir() if p.name != "catalogue.yaml"} <= named


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_bad_input_is_refused_cleanly(case, tmp_path, tiny_teacher_dir, prompts_file):
    runs = tmp_path / "runs"
    teacher, prompts, extra = tiny_teacher_dir, prompts_file, []
    subject = None
    if "prompts" in case:
        prompts = subject = HERE / case["prompts"]
    elif "teacher" in case:
        teacher = subject = HERE / case["teacher"]
    for item in case.get("set", []):
        extra += ["--set", item]
    if "recipe" in case:
        recipe = subject = HERE / case["recipe"]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(runs, teacher, prompts)))
    before = _digest(subject) if subject else None
    out = CliRunner().invoke(app, ["run", str(recipe), *extra])
    text = " ".join(out.output.split())  # the console wraps long lines
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and (out.exception is None or isinstance(out.exception, SystemExit))
    for needle in case["expect"]:
        assert needle.replace("{file}", str(subject)) in text, text
    assert not runs.exists() and not (Path.cwd() / "runs" / "tiny").exists()
    if subject is not None:
        assert _digest(subject) == before  # nothing written to or lost from the input
