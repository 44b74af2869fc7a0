"""The default recipe as ``make demo`` runs it, timed, with every figure the README's tables show.

    python bench/demo.py [--keep]

Runs ``distill run`` (the embedded recipe, run folder ``runs/default``) in a child process, from
an empty run folder unless ``--keep``; the converted teacher and the precision probe may come from
``~/.cache/distill`` (the record says whether they did). Writes bench/results/demo.json:

- ``wall_s``: the whole ``distill run``; ``stages``: seconds per stage (the run's timings.json);
- ``steps``, ``seconds_per_step``: training steps that fit the time budget; ``time_plan``: the
  plan they ran under (the first plan's ``first_max_steps``, its ``refits``); ``train_elapsed_s``:
  the training clock the budget counts, at the end of the last step (metrics.jsonl's ``elapsed_s``;
  the train stage adds loading and the final save);
- ``precision``: what the probe chose and why; ``cpu``: the CPU's model name;
- ``eval``: the run's eval.json without its per-prompt rows (every model's figures, intervals,
  speed, memory, size, tasks);
- ``console_lines``: lines the run printed to the console (stdout and stderr);
- the command and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from candidates import last_elapsed  # bench/, the script's own folder

from distill.core.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo.json"
RUN = ROOT / "runs" / "default"
CACHE = Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _strip(obj):
    """eval.json without the per-prompt rows (kept in the run folder)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "per_prompt"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="resume the run folder instead of starting afresh")
    args = ap.parse_args()
    if not args.keep:
        shutil.rmtree(RUN, ignore_errors=True)
    cached = CACHE.is_dir() and any(CACHE.iterdir())
    distill = Path(sys.executable).with_name("distill")
    log = ROOT / "runs" / "demo-console.log"
    log.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run([str(distill), "run"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"distill run failed ({done.returncode}): see {log}")
    summary = json.loads((RUN / "train_summary.json").read_text())
    stages = json.loads((RUN / "timings.json").read_text())
    result = {
        "wall_s": wall,
        "wall_min": wall / 60,
        "stages": stages,
        "steps": summary["steps"],
        "seconds_per_step": stages["train"] / summary["steps"],
        "time_plan": summary.get("time_plan"),  # the first plan's step count and the refits after it
        "train_elapsed_s": last_elapsed(RUN / "metrics.jsonl"),  # the budget's clock at the last step
        "precision": json.loads((RUN / "precision.json").read_text()),
        "eval": _strip(json.loads((RUN / "eval.json").read_text())),
        "console_lines": len(log.read_text(errors="replace").splitlines()),
        "teacher_cache_present_at_start": cached,
        "cpu": cpu_model(),
        "command": "python bench/demo.py" + (" --keep" if args.keep else ""),
        "date": dt.date.today().isoformat(),
    }
    if (RUN / "export_check.json").is_file():
        result["export_check"] = json.loads((RUN / "export_check.json").read_text())
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("eval", "export_check")}, indent=1))


if __name__ == "__main__":
    main()
