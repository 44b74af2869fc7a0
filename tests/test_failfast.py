"""Fail fast: every bad input a user tried is refused at the start, in one line, with exit code 2,
no traceback, and no run folder left behind."""

from __future__ import annotations

import json
import re
import struct

import pytest
import yaml
from typer.testing import CliRunner

from distill import cli
from distill.cli import app
from distill.core.models import gguf_metadata
from distill.stages import generate as generate_stage

from conftest import tiny_recipe

runner = CliRunner()


def _invoke(tmp_path, recipe: dict, *extra: str, stage: str = "run"):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = [stage, str(path)] if stage == "run" else [stage, "-c", str(path)]
    return runner.invoke(app, [*args, *extra])


def _refused(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    for n in needles:
        assert n in out.output, out.output


def _gguf_bytes(arch: str, layers: int = 2) -> bytes:
    """A GGUF header (version 3, no tensors) with a few keys, in the format's own layout."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kv = [("general.architecture", 8, s(arch)), (f"{arch}.block_count", 4, struct.pack("<I", layers)),
          (f"{arch}.embedding_length", 4, struct.pack("<I", 32))]  # fmt: skip
    body = b"".join(s(k) + struct.pack("<I", t) + v for k, t, v in kv)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + body


@pytest.fixture()
def runs(tmp_path):
    return tmp_path / "runs"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.loss=kl_typo", "train.loss: unknown loss"),
        ("train.loss=forward_lk", "did you mean 'forward_kl'?"),
        ("student.num_layers=100", "student.num_layers=100: teacher"),
        ("student.layers=[0, 9]", "student.layers: [9] out of range"),
        ("train.alpha=1.5", "train.alpha"),
        ("train.jsd_beta=1", "train.jsd_beta"),
        ("train.distill_temperature=0", "train.distill_temperature"),
        ("train.time_budget=soon", "not a duration"),
        ("train.lerning_rate=1", "did you mean"),
        ("cache.use=true", None),  # fine on its own ...
    ],
)
def test_config_mistakes_exit_2_before_any_work(tmp_path, runs, tiny_teacher_dir, prompts_file, monkeypatch,
                                                override, needle):  # fmt: skip
    started = []
    monkeypatch.setattr(generate_stage, "generate_answers", lambda *a, **k: started.append(1))
    recipe = tiny_recipe(runs, tiny_teacher_dir, prompts_file)
    if needle is None:  # ... but k larger than the tiny vocabulary is not
        override, needle = "cache.k=100000", "cache.k=100000 exceeds the vocabulary"
        recipe["cache"] = {"use": True}
    out = _invoke(tmp_path, recipe, "--set", override)
    _refused(out, needle)
    assert not started and not runs.exists()


def test_extra_samples_with_an_api_teacher_exit_2(tmp_path, runs, tiny_teacher_dir, prompts_file):
    """Asked for on the command line with an API teacher: refused. Set by the recipe: set to 0, with
    a note (the embedded default asks for one, and its API quickstart must still run)."""
    from distill.core.recipe import load_config_with_notes

    recipe = tiny_recipe(runs, tiny_teacher_dir, prompts_file)
    recipe["teacher"]["kind"] = "openai"
    out = _invoke(tmp_path, recipe, "--set", "generate.extra_samples=2")
    _refused(out, "generate.extra_samples is for a local teacher", "teacher.api.n")
    assert not runs.exists()
    recipe["generate"]["extra_samples"] = 2
    (tmp_path / "api.yaml").write_text(yaml.safe_dump(recipe))
    cfg, notes = load_config_with_notes(tmp_path / "api.yaml")
    assert cfg.generate.extra_samples == 0 and notes == [
        "generate.extra_samples -> 0: an API teacher's answers per prompt are teacher.api.n"
    ]
    out = _invoke(tmp_path, recipe, "--set", "generate.resample=2")
    _refused(out, "generate.resample is for a local teacher", "teacher.api.n")
    assert not runs.exists()


def test_bad_prompt_files_exit_2_naming_file_and_line(tmp_path, runs, tiny_teacher_dir):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        '{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n{"id": "a", "prompt": "three"}\n'
    )
    for path, needles in ((latin1, [f"{latin1}:2: not UTF-8", "0xe9"]),
                          (dup, [f"{dup}:3: prompt id 'a' is already used at {dup}:1"])):  # fmt: skip
        out = _invoke(tmp_path, tiny_recipe(runs, tiny_teacher_dir, path), stage="generate")
        _refused(out, *needles)
        assert not runs.exists()


def test_bad_model_files_exit_2(tmp_path, runs, prompts_file):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(_gguf_bytes("llama")[:30])
    alien = tmp_path / "alien.gguf"
    alien.write_bytes(_gguf_bytes("rwkv9"))
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    cases = [
        (corrupt, "not a GGUF file (wrong magic bytes)"),
        (truncated, "cut short"),
        (alien, "architecture 'rwkv9' cannot be loaded"),
        (empty_dir, "no config.json"),
        (tmp_path / "missing.gguf", "does not exist"),
    ]
    for model, needle in cases:
        out = _invoke(tmp_path, tiny_recipe(runs, model, prompts_file))
        _refused(out, str(model.name), needle)
        assert not runs.exists()


def test_gguf_header_reader_reads_what_it_was_given(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_bytes("llama", layers=7))
    assert gguf_metadata(path) == {"general.architecture": "llama", "llama.block_count": 7,
                                   "llama.embedding_length": 32}  # fmt: skip


def test_a_stage_that_cannot_start_leaves_no_run_folder(tmp_path, runs, tiny_teacher_dir, prompts_file):
    out = _invoke(tmp_path, tiny_recipe(runs, tiny_teacher_dir, prompts_file), stage="train")
    _refused(out, "student_init is missing: run `distill shrink`")
    assert not runs.exists()


def test_an_unexpected_error_prints_a_line_and_the_log_path(tmp_path, runs, tiny_teacher_dir, prompts_file,
                                                          monkeypatch):  # fmt: skip
    def boom(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(generate_stage, "generate_answers", boom)
    out = _invoke(tmp_path, tiny_recipe(runs, tiny_teacher_dir, prompts_file), stage="generate")
    assert out.exit_code == 1 and "unexpected error: ZeroDivisionError: a bug" in out.output
    assert "Traceback" not in out.output
    log = re.search(r"the traceback is in (\S+\.log)", out.output).group(1)
    text = open(log).read()
    assert "Traceback" in text and "ZeroDivisionError" in text
    assert not runs.exists()


def test_a_failure_after_finished_work_keeps_the_folder(tmp_path, runs, tiny_teacher_dir, prompts_file):
    """What a stage finished stays: only a folder holding nothing but the start files is removed."""
    recipe = tiny_recipe(runs, tiny_teacher_dir, prompts_file)
    assert _invoke(tmp_path, recipe, stage="generate").exit_code == 0
    out = _invoke(tmp_path, recipe, stage="train")
    _refused(out, "student_init is missing")
    assert (runs / "tiny" / "answers.jsonl").is_file()
    assert json.loads((runs / "tiny" / "precision.json").read_text())["teacher"]["dtype"] == "float32"


def test_crash_logs_go_under_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    log = cli._crash_log(ValueError("boom"))
    assert log.parent == tmp_path / "logs" and "ValueError: boom" in log.read_text()


def test_onpolicy_rows_need_the_teachers_tokenizer_even_at_alpha_0(
    tmp_path, runs, tiny_teacher_dir, prompts_file, monkeypatch
):
    """The live teacher grades the student's own samples id by id: a student with another tokenizer
    is refused before generation, whatever alpha weighs."""
    from types import SimpleNamespace

    from distill.teacher import audit

    other = SimpleNamespace(token_level=False, lines=lambda: ["the two vocabularies differ"])
    monkeypatch.setattr(audit, "audit_models", lambda *a, **k: other)
    started = []
    monkeypatch.setattr(generate_stage, "generate_answers", lambda *a, **k: started.append(1))
    recipe = tiny_recipe(runs, tiny_teacher_dir, prompts_file, train={"alpha": 0.0, "onpolicy_fraction": 0.5},
                         student={"init": "model", "model": str(tiny_teacher_dir)})  # fmt: skip
    out = _invoke(tmp_path, recipe)
    _refused(
        out,
        "train.onpolicy_fraction=0.5 grades the student's samples",
        "train.alpha=0 and train.onpolicy_fraction=0",
    )
    assert not started and not runs.exists()


def test_humaneval_without_a_sandbox_is_refused_before_any_work(
    tmp_path, runs, tiny_teacher_dir, prompts_file, monkeypatch
):
    from distill.evaluate import tasks

    started = []
    monkeypatch.setattr(generate_stage, "generate_answers", lambda *a, **k: started.append(1))
    monkeypatch.setattr(tasks, "sandbox_available", lambda: False)
    recipe = tiny_recipe(runs, tiny_teacher_dir, prompts_file)
    recipe.setdefault("evaluate", {})["tasks"] = ["humaneval"]
    out = _invoke(tmp_path, recipe, stage="generate")
    _refused(out, "evaluate.unsafe_code=true")
    assert not started and not runs.exists()
