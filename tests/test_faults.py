"""The fault suite: `distill generate`, `distill cache` and `distill train` killed with SIGKILL at
random points, then run again, must end exactly where an uninterrupted run ends.

Each stage first runs once uninterrupted (the reference, timed). Each trial copies the finished
earlier stages into a fresh run folder, starts the stage in a child process, SIGKILLs it after a
seeded fraction of the reference's duration (drawn in strata, so the kills spread over the whole
stage, not only its start), then runs the same stage again and checks:

- generate: every prompt answered once, no id twice, each answer the reference's token for token;
- cache: the shards byte for byte the reference's, none missing or extra, ``verify_cache`` clean;
- train: the final weights equal to the uninterrupted run's, ``metrics.jsonl`` with each step once.

Children come from a forkserver that has imported distill (and torch) once, so a trial costs the
stage's own work, not an interpreter start. A trial whose child finished before its kill time is
not counted and its kill time is tried again against the shorter duration measured; trials go on
until ``KILLS`` real kills per stage. Until three kills have come
after saved work, every other trial waits for the stage's first answer, shard or checkpoint on
disk and kills shortly after it, so that case does not depend on the machine's speed.
Set ``DISTILL_FAULT_REPORT=<file>`` to get the tallies as JSON (bench/RESULTS.md quotes them).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe

KILLS = 10  # per stage
MAX_TRIALS = 30
STAGES = {  # stage -> (the pipeline function, the stages before it)
    "generate": ("generate", ()),
    "cache": ("build_teacher_cache", ("generate",)),
    "train": ("train_student", ("generate", "shrink", "build_teacher_cache")),
}
TALLY: dict[str, dict] = {}

pytestmark = pytest.mark.faults


def _run(config: str, function: str) -> None:  # in the child
    from distill import pipeline
    from distill.core.recipe import load_config

    getattr(pipeline, function)(load_config(config))


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["distill.pipeline", "distill.config", "test_faults"])
    return ctx


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_teacher_dir):
    """A prompt file large enough that each stage has many units of work (batches, shards, steps)."""
    root = tmp_path_factory.mktemp("faults")
    prompts = root / "prompts.jsonl"
    words = "cat dog sun tree blue red fast slow one two three four".split()
    with prompts.open("w") as f:
        for i in range(48):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5))
            f.write(json.dumps({"id": f"q{i:03d}", "prompt": f"say {text}"}) + "\n")
    return root, prompts, tiny_teacher_dir


def _config(folder: Path, prompts: Path, teacher: Path) -> Path:
    recipe = tiny_recipe(folder / "runs", teacher, prompts,
                         data={"heldout_size": 4},
                         generate={"max_new_tokens": 16, "batch_size": 2},
                         cache={"use": True, "k": 8, "samples_per_shard": 2, "batch_size": 1},
                         train={"max_steps": 300, "checkpoint_every": 20, "batch_size": 4})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "r.yaml"


def _prepared(root: Path, stage: str, prompts: Path, teacher: Path) -> Path:
    """A run folder with the stages before ``stage`` done, made once per stage and copied per trial."""
    from distill import pipeline
    from distill.core.recipe import load_config

    done = root / f"before-{stage}"
    if not done.exists():
        cfg_path = _config(done, prompts, teacher)
        for fn in STAGES[stage][1]:
            getattr(pipeline, fn)(load_config(cfg_path))
    return done


def _copy(src: Path, dst: Path, prompts: Path, teacher: Path) -> Path:
    if (src / "runs").exists():
        shutil.copytree(src / "runs", dst / "runs")
    return _config(dst, prompts, teacher)


def _child(ctx, config: Path, function: str):
    p = ctx.Process(target=_run, args=(str(config), function))
    p.start()
    return p


def _outputs(run: Path, stage: str) -> dict:
    if stage == "generate":
        recs = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
        return {"ids": [r["id"] for r in recs], "answers": {r["id"]: r["token_ids"] for r in recs}}
    if stage == "cache":
        cache = run / "teacher_cache"
        return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.suffix == ".safetensors"}
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"steps": steps, "weights": load_file(run / "student" / "model.safetensors")}


def _progress(run: Path, stage: str) -> int:
    """How far a killed stage had got: answers on disk, shards on disk, the last checkpoint's step."""
    if stage == "generate":
        path = run / "answers.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0
    if stage == "cache":
        return len(list((run / "teacher_cache").glob("shard-*.safetensors")))
    steps = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def _check(stage: str, got: dict, ref: dict, run: Path) -> None:
    if stage == "generate":
        assert len(got["ids"]) == len(set(got["ids"])), "an answer was written twice"
        assert set(got["ids"]) == set(ref["ids"]), "an answer was lost"
        assert got["answers"] == ref["answers"]
    elif stage == "cache":
        from distill.teacher.cache import verify_cache

        assert sorted(got) == sorted(ref), "a shard was lost or added"
        assert all(got[k] == ref[k] for k in ref), "a shard differs from the uninterrupted run's"
        assert verify_cache(run / "teacher_cache") == []
    else:
        assert got["steps"] == ref["steps"] == list(range(1, len(ref["steps"]) + 1))
        assert got["weights"].keys() == ref["weights"].keys()
        for k, v in ref["weights"].items():
            assert torch.equal(got["weights"][k], v), f"{k} differs from the uninterrupted run's"


def _kill_fractions(rng: random.Random, n: int) -> list[float]:
    """Kill times as fractions of the reference's duration, one drawn in each of ``n`` equal strata
    of [0.05, 0.95], ordered from the ends inwards (lowest, highest, second lowest, ...) so the first
    timed kills already span the stage. A target whose trial finished before its kill is tried again
    (with the shorter duration measured), not skipped: a late kill is never left to chance."""
    width = 0.9 / n
    strata = [rng.uniform(0.05 + i * width, 0.05 + (i + 1) * width) for i in range(n)]
    order = [i for pair in zip(range(n), reversed(range(n)), strict=True) for i in pair]
    return [strata[i] for i in order[:n]]


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_anywhere_then_resume_ends_as_an_uninterrupted_run(stage, base, forkserver, tmp_path):
    from distill import pipeline
    from distill.core.recipe import load_config

    root, prompts, teacher = base
    function = STAGES[stage][0]
    before = _prepared(root, stage, prompts, teacher)
    # one untimed run first, so the timed reference starts as warm as the trials do (kernels compiled
    # and cached on disk, files in the page cache): a cold reference is slower than every trial, and
    # the kills late in the stage would then come after a trial had already finished
    warm = _child(forkserver, _copy(before, tmp_path / "warm", prompts, teacher), function)
    warm.join()
    shutil.rmtree(tmp_path / "warm")
    # the reference: uninterrupted, in a child like the trials, timed
    ref_cfg = _copy(before, tmp_path / "ref", prompts, teacher)
    t0 = time.perf_counter()
    p = _child(forkserver, ref_cfg, function)
    p.join()
    duration = time.perf_counter() - t0
    assert p.exitcode == 0
    ref_run = load_config(ref_cfg).run_dir
    ref = _outputs(ref_run, stage)

    rng = random.Random(f"faults-{stage}")
    targets = _kill_fractions(rng, KILLS)
    kills, fractions, resumed_mid, progress = 0, [], 0, []
    for trial in range(MAX_TRIALS):
        if kills == KILLS:
            break
        cfg_path = _copy(before, tmp_path / f"t{trial}", prompts, teacher)
        run = load_config(cfg_path).run_dir
        fraction = targets[0]
        # until three kills came after saved work, every other trial waits for the first answer,
        # shard or checkpoint on disk and kills soon after: timing alone would leave that to the
        # machine's speed (a loaded machine spends most of a stage starting up)
        after_saved = trial % 2 == 1 and sum(n > 0 for n in progress) < 3
        t0 = time.perf_counter()
        p = _child(forkserver, cfg_path, function)
        if after_saved:
            while p.is_alive() and _progress(run, stage) == 0:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05) * duration)
            fraction = (time.perf_counter() - t0) / duration
        while p.is_alive() and time.perf_counter() - t0 < fraction * duration:
            time.sleep(0.01)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
        if p.exitcode == 0:  # it finished before the kill landed (a faster machine): not a fault
            duration = min(duration, time.perf_counter() - t0)  # a better estimate; the same target again
            shutil.rmtree(tmp_path / f"t{trial}")
            continue
        assert p.exitcode == -signal.SIGKILL, f"the stage failed on its own (exit {p.exitcode})"
        if not after_saved:
            targets.pop(0)
        kills += 1
        fractions.append(round(fraction, 3))
        progress.append(_progress(run, stage))
        if stage == "train" and any((run / "checkpoints").glob("step-*")):
            resumed_mid += 1
        getattr(pipeline, function)(load_config(cfg_path))  # the same stage again, to the end
        _check(stage, _outputs(run, stage), ref, run)
        shutil.rmtree(tmp_path / f"t{trial}")
    assert kills == KILLS, f"only {kills} of {MAX_TRIALS} trials were killed mid-stage"
    assert min(fractions) < 0.35 and max(fractions) > 0.65  # spread over the whole stage
    # kills after work was saved (answers, shards, a checkpoint), not only before the first
    assert sum(p > 0 for p in progress) >= 3, progress
    TALLY[stage] = {
        "kills": kills,
        "survived": kills,
        "kill_fractions": sorted(fractions),
        "reference_seconds": round(duration, 2),
        "resumed_from_checkpoint": resumed_mid if stage == "train" else None,
        "finished_at_kill": progress,  # answers written / shards written / last checkpoint step
    }
    report = os.environ.get("DISTILL_FAULT_REPORT")
    if report:
        Path(report).write_text(json.dumps(TALLY, indent=1))
