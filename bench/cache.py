"""Offline teacher cache vs live teacher on the default recipe.

    python bench/cache.py [--steps 60]

Needs the default run's teacher answers and untrained student (``make demo`` or
``distill generate`` + ``distill shrink``); it copies them into two bench runs,
``runs/bench-cache-live`` and ``runs/bench-cache-topk``, and then:

1. builds the k = 32 cache and measures its bytes per scored token;
2. trains the same student for the same steps from live dense logits and from the
   cache, each in its own subprocess (so peak RSS is its own), recording student
   training tokens/s and peak RSS;
3. scores both students on the held-out prompts: per-token KL(teacher || student).

Figures go to bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cache.json"


CHUNKED = os.environ.get("BENCH_CHUNKED_LOSS", "1") == "1"


def _overrides(name: str, steps: int, use_cache: bool) -> list[str]:
    # Both contenders use the same trainer settings; the chunked loss (no (B, T, V) student
    # logits) is the setting to use with a cache, and BENCH_CHUNKED_LOSS=0 turns it off.
    return [f"name={name}", f"train.max_steps={steps}", f"cache.use={str(use_cache).lower()}",
            f"train.checkpoint_every={steps}", f"train.chunked_loss={str(CHUNKED).lower()}"]  # fmt: skip


def train_child(name: str, steps: int, use_cache: bool) -> None:
    from distill import pipeline
    from distill.config import load_config

    cfg = load_config(None, _overrides(name, steps, use_cache))
    t0 = time.perf_counter()
    pipeline.train_student(cfg, resume=False)
    wall = time.perf_counter() - t0
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"tokens_per_s": summary["tokens"] / summary["seconds"], "peak_rss_bytes": peak}
    out.update(train_seconds=summary["seconds"], stage_seconds=wall, tokens=summary["tokens"])
    print(json.dumps(out))


def heldout_kl(run: Path, cfg) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.evaluate import forced_metrics
    from distill.generate import read_answers
    from distill.models import load_model, load_tokenizer
    from distill.pipeline import load_split, training_examples

    _, held = load_split(cfg)
    tok = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model)
    ex = training_examples(cfg, tok, held, read_answers(run / "answers.jsonl"))  # same encoding as training
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    return forced_metrics(student, teacher, ex, tok.pad_token_id, 8)["kl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--source", default="runs/default")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        train_child(args.child[0], int(args.child[1]), args.child[2] == "1")
        return

    from distill import pipeline
    from distill.config import load_config

    src = Path(args.source)
    for need in ("answers.jsonl", "split.json", "student_init"):
        if not (src / need).exists():
            sys.exit(f"{src / need} missing: run `make demo` (or distill generate + shrink) first")
    runs = {"live": "bench-cache-live", "topk": "bench-cache-topk"}
    for name in runs.values():
        dst = Path("runs") / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        shutil.copy(src / "answers.jsonl", dst)
        shutil.copy(src / "split.json", dst)
        shutil.copytree(src / "student_init", dst / "student_init")

    cfg_topk = load_config(None, _overrides(runs["topk"], args.steps, True))
    t0 = time.perf_counter()
    cache_dir = pipeline.build_teacher_cache(cfg_topk)
    cache_seconds = time.perf_counter() - t0
    meta = json.loads((cache_dir / "meta.json").read_text())
    shard_bytes = sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))
    from safetensors import safe_open

    rows = 0
    for p in cache_dir.glob("shard-*.safetensors"):
        with safe_open(p, "np") as f:
            rows += f.get_slice("tail").get_shape()[0]

    figures = {}
    for label, name in runs.items():
        cmd = [sys.executable, __file__, "--child", name, str(args.steps), "1" if label == "topk" else "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        figures[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(label, figures[label], flush=True)
    for label, name in runs.items():
        cfg = load_config(None, _overrides(name, args.steps, label == "topk"))
        figures[label]["heldout_kl"] = heldout_kl(cfg.run_dir, cfg)
        print(label, "held-out KL", figures[label]["heldout_kl"], flush=True)

    live, topk = figures["live"], figures["topk"]
    import torch

    result = {
        "bytes_per_token_k32": shard_bytes / rows,
        "cache_vs_live_tokens_per_s_ratio": topk["tokens_per_s"] / live["tokens_per_s"],
        "cache_vs_live_peak_rss_ratio": topk["peak_rss_bytes"] / live["peak_rss_bytes"],
        "cache_vs_dense_heldout_kl_rel_diff": (topk["heldout_kl"] - live["heldout_kl"]) / live["heldout_kl"],
        "raw": {
            "live": live,
            "cache": topk,
            "cache_build_seconds": cache_seconds,
            "cached_tokens": rows,
            "shard_bytes": shard_bytes,
            "k": meta["k"],
            "id_dtype": meta["id_dtype"],
            "train_steps": args.steps,
        },  # fmt: skip
        "chunked_loss": CHUNKED,
        "command": ("" if CHUNKED else "BENCH_CHUNKED_LOSS=0 ")
        + f"python bench/cache.py --steps {args.steps}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
