"""What a run prints: our own lines and progress on the console, other libraries' output in
logs/run.log, progress as plain lines outside a terminal."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml
from rich.progress import Progress

from distill.core import progress
from distill.core.progress import PlainProgress, progress_bar
from distill.core.runlog import run_output

from conftest import tiny_recipe, tiny_run, worker_env

# Lines other libraries print while a tiny run loads, saves and exports its models.
THIRD_PARTY = ("Loading weights", "Writing model shards", "Writing the following files")


def test_plain_progress_lines_on_a_fake_clock():
    """Nothing before a bar has run one interval (its 25 % mark included), a line after each
    interval, one when the bar closes half-way; the rate counts this bar's own work (not the 20
    steps resumed), the ETA follows from it."""
    now, lines = [0.0], []
    bar = PlainProgress("step", interval=30, clock=lambda: now[0], write=lines.append)
    with bar:
        task = bar.add_task("train", total=100, completed=20, info="")
        for t, steps in ((10, 2), (20, 4), (45, 1), (50, 1), (55, 2)):
            now[0] = t
            bar.update(task, advance=steps, info=f"loss {t / 10:.3f}")
        now[0] = 60
    assert lines == [
        "train: 27/100 step (27%) · 0.156 step/s · elapsed 0:00:45 · eta 0:07:49 · loss 4.500",  # 30 s on
        "train: 30/100 step (30%) · 0.167 step/s · elapsed 0:01:00 · eta 0:07:00 · loss 5.500",  # closed
    ]


def test_a_long_bar_prints_its_percent_marks_and_a_short_one_only_its_end():
    now, lines = [0.0], []
    bar = PlainProgress("it", interval=30, clock=lambda: now[0], write=lines.append)
    with bar:
        long = bar.add_task("long", total=8, info="")
        for i in range(8):
            now[0] = 10 * (i + 1)
            bar.update(long, advance=1)
        short = bar.add_task("short", total=4, info="")
        for _ in range(4):
            now[0] += 2
            bar.update(short, advance=1)
    assert lines == [
        "long: 3/8 it (38%) · 0.1 it/s · elapsed 0:00:30 · eta 0:00:50",  # 30 s on (25 % came before)
        "long: 4/8 it (50%) · 0.1 it/s · elapsed 0:00:40 · eta 0:00:40",  # 50 %
        "long: 6/8 it (75%) · 0.1 it/s · elapsed 0:01:00 · eta 0:00:20",  # 75 %
        "long: 8/8 it (100%) · 0.1 it/s · elapsed 0:01:20 · eta 0:00:00",  # its end
        "short: 4/4 it (100%) · 0.5 it/s · elapsed 0:00:08 · eta 0:00:00",  # only its end
    ]


def test_plain_progress_marks_a_changed_total_and_a_bar_without_progress():
    now, lines = [0.0], []
    bar = PlainProgress("shard", interval=1000, clock=lambda: now[0], write=lines.append)
    with bar:
        task = bar.add_task("teacher cache", total=4, info="")
        now[0] = 2
        bar.update(task, advance=1, info="80 tokens")
        now[0] = 4
        bar.update(task, total=2)  # a smaller total: half done at once
        idle = bar.add_task("idle", total=3)
    assert lines == [  # no mark before an interval; the bar closes half-way and says where it stopped
        "teacher cache: 1/2 shard (50%) · 0.25 shard/s · elapsed 0:00:04 · eta 0:00:04 · 80 tokens",
    ]
    assert bar.line(idle, 4) == "idle: 0/3 shard (0%) · ? shard/s · elapsed 0:00:00 · eta ?"


def test_progress_is_plain_outside_a_terminal_and_under_term_dumb(monkeypatch):
    from rich.console import Console

    monkeypatch.setenv("DISTILL_PROGRESS_SECONDS", "5")
    monkeypatch.setattr(progress, "console", Console(stderr=True, force_terminal=False))
    bar = progress_bar("step")
    assert isinstance(bar, PlainProgress) and bar.interval == 5
    monkeypatch.setattr(progress, "console", Console(stderr=True, force_terminal=True))
    monkeypatch.setenv("TERM", "xterm-256color")
    assert isinstance(progress_bar("step"), Progress)  # a terminal keeps the live bar
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(progress_bar("step"), PlainProgress)


def test_other_libraries_logging_and_warnings_go_to_run_log_ours_to_the_console(tmp_path, capsys):
    log = tmp_path / "run" / "logs" / "run.log"
    ours_file = str(Path(progress.__file__))
    with run_output(log):
        logging.getLogger("httpx2").info('HTTP Request: POST http://127.0.0.1/v1/chat "HTTP/1.1 200 OK"')
        logging.getLogger("transformers.modeling_utils").warning("some weights were not initialised")
        logging.getLogger("distill.core.models").info("converting teacher.gguf (first load only)")
        warnings.warn_explicit("a library's deprecation", FutureWarning, "/elsewhere/lib.py", 3)
        warnings.warn_explicit("our own [caution]", UserWarning, ours_file, 1)
    err = capsys.readouterr().err
    text = log.read_text()
    for line in ("HTTP Request: POST", "some weights were not initialised", "a library's deprecation"):
        assert line in text and line not in err, line
    assert "converting teacher.gguf (first load only)" in err
    assert "warning: our own [caution]" in err and "our own" not in text
    assert str(log) not in {getattr(h, "baseFilename", None) for h in logging.getLogger().handlers}  # undone
    logging.getLogger("httpx2").info("HTTP Request: after the stage")
    assert "after the stage" not in log.read_text()


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True,
                          env={**worker_env(), **env}, timeout=600)  # fmt: skip


def test_a_run_prints_our_lines_and_logs_the_libraries_lines_verbose_shows_them(
    tmp_path, tiny_teacher_dir, prompts_file
):
    recipe = tmp_path / "r.yaml"
    r = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file)
    r["train"]["alpha"] = 0.5  # KD and CE both weighed
    recipe.write_text(yaml.safe_dump(r))
    done = _cli("run", str(recipe))
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    log = (tmp_path / "runs" / "tiny" / "logs" / "run.log").read_text()
    for line in THIRD_PARTY:
        assert line not in console and line in log, line
    assert "\x1b[" not in console  # no colour outside a terminal
    assert "train: 6/6 step (100%)" in done.stderr and "tok/s" in done.stderr
    last = [ln for ln in done.stderr.splitlines() if ln.startswith("train: 6/6")][-1]
    assert " kd " in last and " ce " in last, last  # alpha 0.5: both terms shown
    assert "teacher: stored answers (read, not generated): 4/4 prompt (100%)" in done.stderr
    assert "student: greedy answers: 4/4 prompt (100%)" in done.stderr

    # a GGUF teacher: transformers' de-quantisation bar goes to run.log, our "converting" line stays
    gguf = tmp_path / "runs" / "tiny" / "export" / "tiny-f16.gguf"
    done = _cli("generate", "-c", str(recipe), "--set", "name=gguf", "--set", f"teacher.model={gguf}")
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "runs" / "gguf" / "logs" / "run.log").read_text()
    assert "de-quantizing GGUF tensors" in log and "de-quantizing" not in done.stdout + done.stderr
    assert "converting tiny-f16.gguf (first load only)" in done.stderr

    done = _cli("--verbose", "generate", "-c", str(recipe), "--set", "name=verbose")
    assert done.returncode == 0, done.stderr
    assert "Loading weights" in done.stderr
    assert (tmp_path / "runs" / "verbose" / "logs" / "run.log").is_file()


def test_progress_lines_are_written_while_the_stage_runs(tmp_path, tiny_teacher_dir, prompts_file):
    """Outside a terminal (stderr is a file) training prints its progress as it goes, with its loss
    and tokens/s, not only when it ends: a line is read while the process still runs. At alpha 1
    (KD alone) the line names no cross-entropy term, which is not computed."""
    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, stages=("generate", "shrink"),
                   train={"max_steps": 100000, "checkpoint_every": 100000, "alpha": 1.0})  # fmt: skip
    err = tmp_path / "stderr.txt"
    args = [sys.executable, "-m", "distill.cli", "train", "-c", str(tmp_path / "r.yaml")]
    with err.open("w") as f:
        env = {**worker_env(), "DISTILL_PROGRESS_SECONDS": "0"}
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        seen = _wait_for_line(err, "train: ", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130, err.read_text()
    assert " step (0%) · " in seen and "step/s" in seen and "eta " in seen, seen
    assert "loss " in seen and " kd " in seen and "tok/s" in seen, seen
    assert " ce " not in seen, seen
    metrics = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) < 100000  # the line came from a stage that had far to go
    assert "\x1b[" not in err.read_text()


def _wait_for_line(path: Path, start: str, proc: subprocess.Popen, timeout: float = 180) -> str:
    """The first line of ``path`` that starts with ``start``, read while ``proc`` runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"ended before printing progress:\n{path.read_text()}"
        for line in path.read_text().splitlines():
            if line.startswith(start):
                return line
        time.sleep(0.1)
    raise AssertionError(f"no progress line while the stage ran:\n{path.read_text()}")
