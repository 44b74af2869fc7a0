"""Ctrl-C and SIGTERM: the stage stops at a safe point, writes what it finished, says how to resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from distill import pipeline
from distill.core.data import read_prompts
from distill.core.recipe import load_config

from conftest import tiny_recipe, tiny_run, worker_env


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=worker_env())  # fmt: skip


def _wait_for(path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before the signal:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("no progress")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_training_stops_after_the_step_with_a_checkpoint_and_resumes(
    tmp_path, tiny_teacher_dir, prompts_file, signum
):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         train={"max_steps": 100000, "checkpoint_every": 100000})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.generate(cfg)
    pipeline.shrink(cfg)
    metrics = cfg.run_dir / "metrics.jsonl"
    proc = _spawn(["train", "-c", str(tmp_path / "r.yaml")])
    _wait_for(metrics, 3, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    last = steps[-1]
    assert steps == list(range(1, last + 1))  # every finished step logged once
    assert f"stopped at step {last} of 100000" in out and "run the same command again to resume" in out
    assert "Traceback" not in out
    ckpt = cfg.run_dir / "checkpoints" / f"step-{last:06d}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last
    # the same command resumes from there (a smaller max_steps so that it ends)
    args = ["train", "-c", str(tmp_path / "r.yaml"), "--set", f"train.max_steps={last + 2}"]
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, env=worker_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, last + 3))


def test_generation_stops_after_the_batch_with_its_answers_kept(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         generate={"batch_size": 1, "max_new_tokens": 12})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    answers = cfg.run_dir / "answers.jsonl"
    proc = _spawn(["generate", "-c", str(tmp_path / "r.yaml")])
    _wait_for(answers, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    kept = answers.read_text().splitlines()
    assert f"stopped after {len(kept)} of" in out and "generate the rest" in out
    assert all(json.loads(x)["token_ids"] for x in kept)  # whole lines only
    pipeline.generate(cfg)  # the rest, none twice
    ids = [json.loads(x)["id"] for x in answers.read_text().splitlines()]
    assert len(ids) == len(set(ids)) > len(kept)


def test_a_full_disk_during_generation_names_the_file_and_the_rerun_finishes(
    tmp_path, tiny_teacher_dir, prompts_file, monkeypatch
):
    import errno
    import os

    from typer.testing import CliRunner

    from distill.cli import app

    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, generate={"batch_size": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    real, calls = os.fsync, {"n": 0}

    def full(fd):  # the third batch's answers do not fit on the disk
        calls["n"] += os.readlink(f"/proc/self/fd/{fd}").endswith("answers.jsonl")
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = CliRunner().invoke(app, ["generate", "-c", str(tmp_path / "r.yaml")])
    answers = tmp_path / "runs" / "tiny" / "answers.jsonl"
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert (
        f"could not write {answers}: No space left on device" in text and "run the same command again" in text
    )
    assert "Traceback" not in out.output
    monkeypatch.setattr(os, "fsync", real)
    out = CliRunner().invoke(app, ["generate", "-c", str(tmp_path / "r.yaml")])
    assert out.exit_code == 0, out.output
    ids = [json.loads(x)["id"] for x in answers.read_text().splitlines()]
    cfg = load_config(tmp_path / "r.yaml")
    assert sorted(ids) == sorted({p.id for p in read_prompts(cfg.data.path)})  # all, once each


def test_resuming_training_on_changed_answers_is_refused(tmp_path, tiny_teacher_dir, prompts_file):
    from typer.testing import CliRunner

    from distill.cli import app

    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, train={"max_steps": 4, "checkpoint_every": 2})
    answers = cfg.run_dir / "answers.jsonl"
    lines = answers.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["token_ids"] = rec["token_ids"][::-1]  # an answer regenerated differently since training began
    answers.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    args = ["train", "-c", str(tmp_path / "r.yaml"), "--set", "train.max_steps=6"]
    out = CliRunner().invoke(app, args)
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert "answers.jsonl changed since training started" in text and "--no-resume" in text
    metrics = cfg.run_dir / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]  # untouched
    out = CliRunner().invoke(app, [*args, "--no-resume"])
    assert out.exit_code == 0, out.output
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7))  # started over: each step once


def _limited(args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    """``distill ARGS`` where no file may grow past ``max_bytes``: a real failed write (EFBIG), as a
    full disk fails it, from inside safetensors' and torch's own writers, with no mock."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True,
                          env={**worker_env(), "COLUMNS": "400"}, preexec_fn=limit, timeout=300)  # fmt: skip


def test_a_failed_write_of_a_shard_or_a_checkpoint_names_it_leaves_nothing_half_written_and_resumes(
    tmp_path, tiny_teacher_dir, prompts_file
):
    from distill.teacher.cache import verify_cache

    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, stages=("generate", "shrink"),
                   cache={"use": True, "k": 8, "samples_per_shard": 64},
                   train={"max_steps": 4, "checkpoint_every": 2})  # fmt: skip
    run, args = cfg.run_dir, ["-c", str(tmp_path / "r.yaml")]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    small = max(p.stat().st_size for p in run.iterdir() if p.is_file()) + 1024  # config.yaml, answers...
    out = _limited(["cache", *args], small)  # they and meta.json fit, the shard does not
    shard = run / "teacher_cache" / "shard-00000.safetensors"
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"could not write {shard}: File too large" in out.stderr, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    left = sorted(p.name for p in (run / "teacher_cache").iterdir())
    assert left == ["meta.json"], left  # no shard, no .tmp, no checksum of a shard that is not there
    after = [p.relative_to(run) for p in run.rglob("*")]
    assert sorted(p for p in after if p.parts[0] not in ("teacher_cache", "logs")) == before  # logs: run.log
    out = _limited(["cache", *args], 1 << 30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert shard.stat().st_size > small and verify_cache(run / "teacher_cache") == []

    model = run / "student_init" / "model.safetensors"
    out = _limited(["train", *args], model.stat().st_size // 2)  # the first checkpoint's weights do not fit
    ckpt = run / "checkpoints"
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"could not write {ckpt}/.tmp-step-000002/model.safetensors: File too large" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert list(ckpt.iterdir()) == []  # neither a half-written checkpoint nor its temporary folder
    assert not (run / "student").exists()
    out = _limited(["train", *args], 1 << 30)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (run / "student" / "model.safetensors").is_file()


def test_every_stage_stops_at_a_safe_point_when_asked(tmp_path, tiny_teacher_dir, prompts_file, monkeypatch):
    """A signal already received when the stage reaches its first safe point: the cache stops after
    one whole shard, evaluation before writing anything; each says so, exits 128 + the signal, and
    the same command then finishes."""
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.core import interrupt

    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, stages=("generate", "shrink"),
                   cache={"use": True, "k": 8, "samples_per_shard": 3},
                   evaluate={"measure_memory": False})  # fmt: skip
    args = ["-c", str(tmp_path / "r.yaml")]
    asked: list[int] = []
    monkeypatch.setattr(interrupt, "_requested", asked)
    asked.append(signal.SIGTERM)
    out = CliRunner().invoke(app, ["cache", *args])
    assert out.exit_code == 143 and "stopped after shard 1 of" in " ".join(out.output.split()), out.output
    assert len(list((cfg.run_dir / "teacher_cache").glob("shard-*.safetensors"))) == 1
    out = CliRunner().invoke(app, ["cache", *args])  # the context cleared the request on the way out
    assert out.exit_code == 0 and len(list((cfg.run_dir / "teacher_cache").glob("shard-*.safetensors"))) > 1
    pipeline.train_student(cfg)
    asked.append(signal.SIGINT)
    out = CliRunner().invoke(app, ["evaluate", *args])
    assert out.exit_code == 130 and "nothing was half-written" in " ".join(out.output.split()), out.output
    assert not (cfg.run_dir / "eval.json").exists()
    out = CliRunner().invoke(app, ["evaluate", *args])
    assert out.exit_code == 0 and (cfg.run_dir / "eval.json").is_file()
    asked.append(signal.SIGTERM)  # the export: its temporary folder removed, no export/ made
    out = CliRunner().invoke(app, ["export", *args, "--format", "hf"])
    assert out.exit_code == 143 and "nothing was half-written" in " ".join(out.output.split()), out.output
    assert not (cfg.run_dir / "export").exists() and not (cfg.run_dir / "export.tmp").exists()
