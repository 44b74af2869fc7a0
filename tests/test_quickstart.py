"""`distill run --teacher --student --data --api-base`: the flags are the --set overrides the README
names, and a flag and a --set naming the same key are refused before anything starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from distill import pipeline
from distill.cli import app
from distill.core.recipe import load_config

runner = CliRunner()


@pytest.fixture()
def ran(monkeypatch):
    """The config `distill run` hands to the pipeline, which does nothing."""
    got = []
    monkeypatch.setattr(pipeline, "run_all", lambda cfg, **kw: got.append(cfg))
    return got


def run_with(args: list[str], ran: list) -> object:
    out = runner.invoke(app, ["run", *args])
    assert out.exit_code == 0, out.output
    return ran[-1]


def test_teacher_student_and_data_flags_are_their_set_overrides(
    tmp_path, ran, tiny_teacher_dir, prompts_file
):
    base = [f"runs_dir={tmp_path}"]
    cfg = run_with(["--teacher", str(tiny_teacher_dir), "--student", "shrink", "--data", str(prompts_file),
                    "--set", base[0]], ran)  # fmt: skip
    same = load_config(None, [*base, "teacher.kind=local", f"teacher.model={tiny_teacher_dir}",
                              "student.init=shrink", f"data.path={prompts_file}"])  # fmt: skip
    assert cfg == same and cfg.teacher.model == str(tiny_teacher_dir) and cfg.data.path == str(prompts_file)

    # a name YAML would read as a number stays the string it is
    cfg = run_with(["--teacher", "smollm2-135m-instruct", "--student", "2024.10", "--set", base[0]], ran)
    same = load_config(None, [*base, "student.init=model", "student.model='2024.10'"])
    assert cfg == same and (cfg.student.init, cfg.student.model) == ("model", "2024.10")


def test_api_base_makes_the_teacher_the_model_that_endpoint_serves(tmp_path, ran, tiny_teacher_dir):
    url = "https://api.example.com/v1"
    cfg = run_with(["--teacher", "gpt-4o-mini", "--api-base", url, "--student", str(tiny_teacher_dir),
                    "--set", f"runs_dir={tmp_path}"], ran)  # fmt: skip
    same = load_config(None, [f"runs_dir={tmp_path}", "teacher.kind=openai", "teacher.model=null",
                              f"teacher.api.base_url={url}", "teacher.api.model=gpt-4o-mini",
                              "student.init=model", f"student.model={tiny_teacher_dir}"])  # fmt: skip
    assert cfg == same
    assert (cfg.teacher.kind, cfg.teacher.model, cfg.teacher.api.model) == ("openai", None, "gpt-4o-mini")


@pytest.mark.parametrize(
    ("flags", "set_", "flag", "key"),
    [
        (["--teacher", "a.gguf"], "teacher.model=b.gguf", "--teacher", "teacher.model"),
        (["--data", "p.jsonl"], "data.path=q.jsonl", "--data", "data.path"),
        (["--student", "shrink"], "student.init=model", "--student", "student.init"),
        (["--teacher", "m", "--api-base", "http://h/v1"], "teacher.api.base_url=http://g/v1", "--api-base",
         "teacher.api.base_url"),
        (["--teacher", "m", "--api-base", "http://h/v1"], "teacher.api.model=n", "--teacher",
         "teacher.api.model"),
        (["--data", "p.jsonl"], "data={path: q.jsonl}", "--data", "data.path"),  # a section holding it
    ],
)  # fmt: skip
def test_a_flag_and_a_set_on_the_same_key_exit_2_naming_both(tmp_path, flags, set_, flag, key):
    runs = tmp_path / "runs"
    out = runner.invoke(app, ["run", *flags, "--set", set_, "--set", f"runs_dir={runs}"])
    assert out.exit_code == 2
    said = " ".join(out.output.split())
    assert f"{flag} sets {key}, and --set {set_} names it too" in said
    assert "Traceback" not in out.output
    assert not runs.exists()


def test_api_base_needs_the_teacher_s_model_name(tmp_path):
    out = runner.invoke(app, ["run", "--api-base", "http://h/v1", "--set", f"runs_dir={tmp_path / 'runs'}"])
    assert out.exit_code == 2 and "--api-base needs --teacher" in out.output
    assert not (tmp_path / "runs").exists()
