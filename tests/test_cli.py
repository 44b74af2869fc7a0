"""The command line: help, config errors before any work, stages wired to the pipeline."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

from conftest import tiny_recipe

runner = CliRunner()


def test_help_lists_every_stage():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for cmd in ("run", "generate", "shrink", "cache", "train", "evaluate", "export", "show-config"):
        assert cmd in out.output
    out = runner.invoke(app, ["train", "--help"])
    assert out.exit_code == 0 and "--set" in out.output and "--resume" in out.output


def test_config_errors_exit_2_before_any_work(tmp_path):
    out = runner.invoke(app, ["run", "--set", "train.learning_rate=0.1", "--set", f"runs_dir={tmp_path}"])
    assert out.exit_code == 2
    assert "train.learning_rate: unknown key" in out.output
    assert not list(tmp_path.iterdir())  # nothing was started
    out = runner.invoke(app, ["generate", "--set", "generate.batch_size=zero"])
    assert out.exit_code == 2 and "generate.batch_size" in out.output


def test_show_config_applies_overrides():
    out = runner.invoke(app, ["show-config", "--set", "student.num_layers=6"])
    assert out.exit_code == 0
    assert yaml.safe_load(out.output)["student"]["num_layers"] == 6


def test_bad_prompt_file_is_a_clear_error(tmp_path, tiny_teacher_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, bad)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = runner.invoke(app, ["generate", "-c", str(tmp_path / "r.yaml")])
    assert out.exit_code == 2 and "p.jsonl:2: needs a 'prompt' or a 'messages' field" in out.output


def test_stages_one_by_one_then_cache_verify(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, cache={"k": 4})
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    for stage in ("generate", "shrink", "train", "evaluate", "export", "cache"):
        out = runner.invoke(app, [stage, "-c", str(cfg)])
        assert out.exit_code == 0, (stage, out.output)
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "eval.json").read_text())["student"]["params"] > 0
    out = runner.invoke(app, ["cache", "-c", str(cfg), "--verify"])
    assert out.exit_code == 0 and "every shard matches" in out.output
    shard = next((run / "teacher_cache").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    out = runner.invoke(app, ["cache", "-c", str(cfg), "--verify"])
    assert out.exit_code == 1 and "checksum mismatch" in out.output


def test_a_run_folder_made_by_another_config_is_refused_unless_forced(
    tmp_path, tiny_teacher_dir, prompts_file
):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = str(tmp_path / "r.yaml")
    assert runner.invoke(app, ["generate", "-c", r]).exit_code == 0
    assert runner.invoke(app, ["shrink", "-c", r]).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "config.yaml").read_text()
    # answers made with 12 new tokens, student_init with 2 layers: both named, nothing touched
    out = runner.invoke(
        app, ["train", "-c", r, "--set", "generate.max_new_tokens=10", "--set", "student.num_layers=3"]
    )
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert "generate.max_new_tokens: 12 there, 10 now (made answers.jsonl)" in text
    assert "student.num_layers: 2 there, 3 now (made student_init)" in text and "--force" in text
    assert (run / "config.yaml").read_text() == before and not (run / "metrics.jsonl").exists()
    # what the outputs were not made from may change (training settings)
    out = runner.invoke(app, ["train", "-c", r, "--set", "train.lr=1e-3", "--set", "train.max_steps=2"])
    assert out.exit_code == 0, out.output
    # --force uses the folder anyway, and records the new config
    out = runner.invoke(app, ["shrink", "-c", r, "--set", "student.num_layers=3", "--force"])
    assert out.exit_code == 0, out.output
    assert yaml.safe_load((run / "config.yaml").read_text())["student"]["num_layers"] == 3


_API_TEACHER = [
    "teacher.kind=openai",
    "teacher.model=null",
    "student.init=model",
    "student.model=smollm2-135m-instruct",
    "teacher.api.base_url=http://127.0.0.1:8080/v1",
]


@pytest.mark.parametrize(
    ("signal", "overrides"), [("the cache", ["cache.use=true"]), ("an API teacher", _API_TEACHER)]
)
def test_show_config_with_a_cache_or_an_api_teacher_names_what_it_turned_off(signal, overrides):
    """The default recipe's hidden-state and prompt terms give way to the teacher signal asked for."""
    out = runner.invoke(app, ["show-config", *[a for o in overrides for a in ("--set", o)]])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[:2] == [
        f"# note: train.hidden_weight 1.0 -> 0: needs a live local teacher; the teacher signal is {signal}",
        f"# note: train.prompt_weight 0.5 -> 0: needs a live local teacher; the teacher signal is {signal}",
    ]
    shown = yaml.safe_load(out.output)  # still a recipe: the notes are comments
    assert shown["train"]["hidden_weight"] == 0 and shown["train"]["prompt_weight"] == 0


def test_an_option_asked_for_beside_a_cache_is_refused():
    out = runner.invoke(app, ["show-config", "--set", "cache.use=true", "--set", "train.hidden_weight=1"])
    assert out.exit_code == 2
    assert "train.hidden_weight needs a live local teacher" in " ".join(out.output.split())


def test_a_run_notes_what_the_teacher_signal_turned_off_and_records_it(
    tmp_path, tiny_teacher_dir, prompts_file, monkeypatch
):
    from distill import pipeline

    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, train={"hidden_weight": 1.0})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    started = []
    monkeypatch.setattr(pipeline, "run_all", lambda cfg, **kw: started.append(cfg))
    note = "train.hidden_weight 1.0 -> 0: needs a live local teacher; the teacher signal is the cache"
    out = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--set", "cache.use=true"])
    assert out.exit_code == 0 and note in out.output
    assert started[0].train.hidden_weight == 0
    out = runner.invoke(app, ["generate", "-c", str(tmp_path / "r.yaml"), "--set", "cache.use=true"])
    assert out.exit_code == 0 and note in out.output
    written = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert written["train"]["hidden_weight"] == 0 and written["cache"]["use"] is True


@pytest.mark.parametrize("cache", [False, True])
def test_onpolicy_rows_with_alpha_0_are_graded_by_the_live_teacher(
    tmp_path, tiny_teacher_dir, prompts_file, cache
):
    """alpha weighs KD against CE on the teacher's answers only; the student's own samples are graded
    by the teacher whatever alpha is, so it is loaded for them (and beside a cache, which is not
    built for alpha = 0)."""
    train = {"alpha": 0.0, "onpolicy_fraction": 0.5, "onpolicy_max_new_tokens": 5, "max_steps": 3}
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, train=train, cache={"use": cache})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for stage in ("generate", "shrink", "train"):
        out = runner.invoke(app, [stage, "-c", str(tmp_path / "r.yaml")])
        assert out.exit_code == 0, (stage, out.output)
    run = tmp_path / "runs" / "tiny"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sum(r["onpolicy_rows"] for r in rows) > 0
    assert all((r["kd"] > 0) == (r["onpolicy_rows"] > 0) for r in rows)  # KD on the sampled rows only
    summary = json.loads((run / "train_summary.json").read_text())
    assert "graded by the live teacher" in summary["teacher_signal"]
