"""When does the offline cache pay? Cache vs live teacher as the teacher grows.

    python bench/cache_scaling.py [--steps 20]

Run after bench/cache.py (it reuses that bench's runs: the default recipe's answers, its
untrained student and the k = 32 cache with tail samples). The student trains for the same
steps, with the same seed and data, from the cache and from a live teacher of three sizes, with
the losses only a live teacher of the student's own shape can serve (hidden-state alignment, prompt
tokens) off on both sides, so that only the teacher signal differs:

* SmolLM2-135M-Instruct, the default teacher (real weights);
* teachers with SmolLM2's tokenizer and the shapes of SmolLM2-360M and SmolLM2-1.7B, with
  random weights. A step's time and memory depend on a model's shapes, not on its weights'
  values, so these measure what a real teacher of that shape costs beside the student (their
  logits are meaningless: this bench measures speed and memory only, no quality).

Training from the cache costs the same whatever teacher filled it (same k, same tail samples),
so one cache contender serves all three; it runs first and last and its two runs are averaged.
Each contender trains in its own process, so its peak RSS is its own. The FLOP bound of the
tokens/s ratio, at equal efficiency, is (2 N_teacher + 6 N_student) / (6 N_student).
Figures go to bench/results/cache_scaling.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cache_scaling.json"
RUN = "bench-cache-topk"  # bench/cache.py's run: answers, student_init and the cache
SHAPES = {  # SmolLM2's published configurations (vocabulary 49,152, tied embeddings)
    "smollm2-360m-shape": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                               num_attention_heads=15, num_key_value_heads=5),
    "smollm2-1.7b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                               num_attention_heads=32, num_key_value_heads=32),
}  # fmt: skip


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: linear layers and the LM head."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def random_teacher(name: str, like: Path, out: Path) -> Path:
    """A random-weight teacher of shape ``SHAPES[name]`` with the tokenizer of ``like``, saved in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(like)
    for key, value in SHAPES[name].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(like).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.child:  # the same child as bench/cache.py: train, print tokens/s and peak RSS
        sys.path.insert(0, str(Path(__file__).parent))
        from cache import train_child

        train_child(args.child)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from distill.core.hardware import cpu_model
    from distill.core.models import resolve_model_dir
    from distill.core.recipe import load_config

    run = Path("runs") / RUN
    if not (run / "teacher_cache" / "meta.json").is_file():
        sys.exit(f"{run}/teacher_cache missing: run `python bench/cache.py` first")
    default = load_config(None, [f"name={RUN}"]).teacher.model
    teachers = {"smollm2-135m (default)": default}
    for name in SHAPES:
        teachers[name] = str(
            random_teacher(name, resolve_model_dir(default), Path("runs") / "bench-teachers" / name)
        )
    n_student = matmul_params(AutoModelForCausalLM.from_pretrained(run / "student_init"))
    n_teacher = {}
    for label, ref in teachers.items():
        n_teacher[label] = matmul_params(
            AutoModelForCausalLM.from_pretrained(resolve_model_dir(ref), dtype=torch.bfloat16)
        )

    base = [
        f"name={RUN}",
        f"train.max_steps={args.steps}",
        "train.seed=0",
        f"train.checkpoint_every={args.steps}",
        "train.time_budget=null",
        "train.hidden_weight=0",
        "train.prompt_weight=0",
    ]
    order = [("cache", None), *((f"live {t}", t) for t in teachers), ("cache", None)]
    figures: dict[str, list[dict]] = {}
    for label, teacher in order:
        ov = base + ["cache.use=true"]
        if teacher is not None:
            # a run folder of its own: the cache's folder was made by the default teacher, and a
            # folder refuses a config with another teacher
            name = f"bench-scaling-{list(teachers).index(teacher)}"
            live_run = Path("runs") / name
            shutil.rmtree(live_run, ignore_errors=True)
            live_run.mkdir(parents=True)
            for f in ("answers.jsonl", "split.json"):
                shutil.copy(run / f, live_run / f)
            shutil.copytree(run / "student_init", live_run / "student_init")
            ov = [f"name={name}", *base[1:], "cache.use=false", f"teacher.model={teachers[teacher]}"]
        out = subprocess.run(
            [sys.executable, __file__, "--child", *ov], capture_output=True, text=True, check=True
        )
        fig = json.loads(out.stdout.strip().splitlines()[-1])
        figures.setdefault(label, []).append(fig)
        print(label, fig, flush=True)

    cache_speed = sum(f["tokens_per_s"] for f in figures["cache"]) / len(figures["cache"])
    cache_rss = max(f["peak_rss_bytes"] for f in figures["cache"])
    rows = {}
    for t in teachers:
        live = figures[f"live {t}"][0]
        rows[t] = {
            "teacher_matmul_params": n_teacher[t],
            "live_tokens_per_s": live["tokens_per_s"],
            "live_peak_rss_bytes": live["peak_rss_bytes"],
            "cache_vs_live_tokens_per_s_ratio": cache_speed / live["tokens_per_s"],
            "cache_vs_live_peak_rss_ratio": cache_rss / live["peak_rss_bytes"],
            "flop_bound_tokens_per_s_ratio": (2 * n_teacher[t] + 6 * n_student) / (6 * n_student),
        }
    result = {
        "teachers": rows,
        "cache_tokens_per_s": cache_speed,
        "cache_peak_rss_bytes": cache_rss,
        "student_matmul_params": n_student,
        "raw": figures,
        "train_steps": args.steps,
        "command": f"python bench/cache_scaling.py --steps {args.steps}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
        "cpu": cpu_model(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
