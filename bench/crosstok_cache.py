"""Across tokenizers: training from the teacher cache vs the live teacher, side by side.

    python bench/crosstok_cache.py [--steps 8] [--rounds 2] [--method span]

Gemma 3 270M teaches SmolLM2-135M-Instruct (span alignment, alpha 0.9, top-128) on the sampled answers
of ``python bench/crosstok.py`` (copied from ``runs/bench-crosstok-sampled-seqkd``). The cache is built
once (timed, its bytes counted); then, in alternating turns, the same student trains the same steps
from the live teacher and from the cache, each turn in its own subprocess, and each keeps its fastest
turn (a slow moment of a shared machine then hits both alike). The per-step losses of the two must
agree up to the cache's float16. Figures: bench/results/crosstok_cache.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "crosstok_cache.json"
SOURCE = ROOT / "runs" / "bench-crosstok-sampled-seqkd"  # the teacher's sampled answers and split
sys.path.insert(0, str(ROOT / "bench"))


def overrides(args, name: str, cached: bool) -> list[str]:
    from crosstok import ANSWERS, base  # the headline bench's settings, to the letter

    settings = argparse.Namespace(steps=args.steps, lr=1e-4, topk=128)
    return [*base(settings), *ANSWERS["sampled"], f"train.cross_tokenizer={args.method}", "train.alpha=0.9",
            f"train.checkpoint_every={args.steps}", f"cache.use={str(cached).lower()}", f"name={name}",
            f"runs_dir={ROOT / 'runs'}"]  # fmt: skip


CHILD = """
import json, sys, time
from distill import pipeline
from distill.core.recipe import load_config
cfg = load_config(None, json.loads(sys.argv[1]))
t0 = time.perf_counter()
pipeline.train_student(cfg, resume=False)
print(json.dumps({"wall": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--method", choices=["span", "uld"], default="span")
    args = ap.parse_args()
    import torch

    from distill import pipeline
    from distill.core.hardware import cpu_model
    from distill.core.recipe import load_config

    if not (SOURCE / "answers.jsonl").is_file():
        sys.exit(f"{SOURCE}/answers.jsonl is missing: run python bench/crosstok.py first")
    names = {
        "live": f"bench-crosstok-cache-{args.method}-live",
        "cached": f"bench-crosstok-cache-{args.method}",
    }
    cfgs = {}
    for mode, name in names.items():
        cfg = load_config(None, overrides(args, name, mode == "cached"))
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for f in ("answers.jsonl", "split.json"):
            shutil.copy(SOURCE / f, cfg.run_dir / f)
        pipeline.shrink(cfg)
        cfgs[mode] = cfg
    cache_dir = cfgs["cached"].run_dir / "teacher_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    pipeline.build_teacher_cache(cfgs["cached"])
    build_s = time.perf_counter() - t0
    cache_bytes = sum(f.stat().st_size for f in cache_dir.glob("shard-*.safetensors"))
    samples = json.loads((cache_dir / "meta.json").read_text())["num_samples"]
    turns: dict[str, list[dict]] = {"live": [], "cached": []}
    for r in range(args.rounds):
        for mode in ("live", "cached") if r % 2 == 0 else ("cached", "live"):
            child = json.dumps(overrides(args, names[mode], mode == "cached"))
            out = subprocess.run(
                [sys.executable, "-c", CHILD, child], capture_output=True, text=True, cwd=ROOT
            )
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            run = cfgs[mode].run_dir
            summary = json.loads((run / "train_summary.json").read_text())
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            wall = json.loads(out.stdout.strip().splitlines()[-1])["wall"]
            turn = {"seconds": summary["seconds"], "steps": summary["steps"], "wall": wall}
            turns[mode].append({**turn, "kd": [x["kd"] for x in rows], "signal": summary["teacher_signal"]})
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            print(f"{mode}: {summary['seconds']:.1f} s for {summary['steps']} steps")
    best = {m: min(t, key=lambda x: x["seconds"]) for m, t in turns.items()}
    per_step = {m: b["seconds"] / b["steps"] for m, b in best.items()}
    kd_live, kd_cached = best["live"]["kd"], best["cached"]["kd"]
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(kd_live, kd_cached, strict=True))
    out = {
        "method": args.method,
        "steps": args.steps,
        "rounds": args.rounds,
        "live_seconds_per_step": round(per_step["live"], 3),
        "cached_seconds_per_step": round(per_step["cached"], 3),
        "cached_speedup": round(per_step["live"] / per_step["cached"], 3),
        "cache_build_seconds": round(build_s, 1),
        "cache_bytes": cache_bytes,
        "cache_samples": samples,
        "kd_max_relative_difference": rel,
        "turns": turns,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "date": dt.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),  # fmt: skip
    }
    RESULTS.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "turns"}, indent=1))


if __name__ == "__main__":
    main()
