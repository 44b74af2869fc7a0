"""Which recipe makes the best student at equal training wall-clock? Held-out quality per recipe.

    python bench/quality.py [--budget 3m] [--seeds 0] [--recipes default,sft,...] [--source runs/default]

Needs a run with the teacher's answers (``make demo``, or ``distill generate``): its
``answers.jsonl`` and ``split.json`` are copied into one run folder per recipe and seed, so every
recipe learns from the same answers and is scored on the same 32 held-out prompts. Each recipe runs
in its own process: ``distill shrink`` (its own layer choice), ``distill train`` for ``--budget`` of
wall-clock (``train.time_budget``; ``max_steps`` set out of reach), then the student alone is
scored on the held-out prompts:

- KL(teacher || student) and top-1 agreement, teacher-forced on the teacher's answers;
- ROUGE-L of its greedy answers against the teacher's;
- the teacher's mean log-prob per token of the student's own greedy answers (what on-policy
  training should raise);
- accuracy where the prompt has a reference.

Figures go to bench/results/quality.json (``--append`` adds runs to those recorded; ``--summarise``
recomputes the table and the keys from them). The keys: the best recipe's KL over the old
default's; the new default recipe's (``NEW_DEFAULT``) top-1 agreement and speed-up; the teacher's
log-prob gain of on-policy training over its off-policy twin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quality.json"
# Every recipe starts from the default recipe of before this benchmark (10 evenly spaced layers,
# off-policy KD + CE), whatever the embedded default is now, so the figures keep their meaning.
BASE = ["student.layer_selection=even", "student.num_layers=10", "student.intermediate_size=null",
        "train.hidden_weight=0", "train.prompt_weight=0", "train.lr=6.0e-4"]  # fmt: skip
RECIPES: dict[str, list[str]] = {
    "default": [],
    "sft_only": ["train.alpha=0"],
    "importance": ["student.layer_selection=importance"],
    "importance_hidden": ["student.layer_selection=importance", "train.hidden_weight=1.0"],
    "onpolicy_0.5": ["train.onpolicy_fraction=0.5"],
    "onpolicy_1": ["train.onpolicy_fraction=1.0"],
    # on-policy once the student writes sense: importance init, lambda rising from 0 to 0.5
    "importance_onpolicy_linear": ["student.layer_selection=importance", "train.onpolicy_fraction=0.5",
                                   "train.onpolicy_schedule=linear"],
    "importance_hidden_prompt": ["student.layer_selection=importance", "train.hidden_weight=1.0",
                                 "train.prompt_weight=0.5"],
    # width pruning: the shape `student.target_params=64M` picks (lowest untrained KL of six at the
    # default student's size): 16 layers, all heads, MLP halved
    "width": ["student.layer_selection=importance", "student.num_layers=16", "student.intermediate_size=768"],
    "width_hidden_prompt": ["student.layer_selection=importance", "student.num_layers=16",
                            "student.intermediate_size=768", "train.hidden_weight=1.0",
                            "train.prompt_weight=0.5"],
    # 14 layers at half MLP: the depth that keeps 2x the teacher's generation speed on this CPU
    "width14": ["student.layer_selection=importance", "student.num_layers=14",
                "student.intermediate_size=768"],
    "width14_hidden_prompt": ["student.layer_selection=importance", "student.num_layers=14",
                              "student.intermediate_size=768", "train.hidden_weight=1.0",
                              "train.prompt_weight=0.5"],
    # the new default at twice the LR: more distance covered in the same few steps
    "width14_hidden_prompt_lr2x": ["student.layer_selection=importance", "student.num_layers=14",
                                   "student.intermediate_size=768", "train.hidden_weight=1.0",
                                   "train.prompt_weight=0.5", "train.lr=1.2e-3"],
    # the new default with the residual stream cut too (Minitron's embedding channels): 432 of 576
    # (transformers wants a multiple of the 9 heads)
    "width14_hidden432_lr2x": ["student.layer_selection=importance", "student.num_layers=14",
                               "student.intermediate_size=768", "student.hidden_size=432",
                               "train.hidden_weight=1.0", "train.prompt_weight=0.5", "train.lr=1.2e-3"],
    # the loss mix and the step size, on the importance student: pure KD, and twice the LR
    "importance_alpha1": ["student.layer_selection=importance", "train.alpha=1.0"],
    "importance_lr2x": ["student.layer_selection=importance", "train.lr=1.2e-3"],
    # a third of the budget on general text first (heal.time_budget counts in the equal wall-clock)
    "importance_hidden_heal": ["student.layer_selection=importance", "train.hidden_weight=1.0",
                               "heal.data=default", "heal.time_budget=1m", "heal.max_steps=1000"],
}  # fmt: skip
# training wall-clock a recipe gives to healing instead of the task (the rest goes to the task)
HEAL_SHARE = {"importance_hidden_heal": "1m"}
# each on-policy recipe against the off-policy recipe with the same student init
OFF_POLICY_TWIN = {
    "onpolicy_0.5": "default",
    "onpolicy_1": "default",
    "importance_onpolicy_linear": "importance",
}
NEW_DEFAULT = (
    "width14_hidden_prompt_lr2x"  # the embedded default recipe now (src/distill/recipes/default.yaml)
)
METRICS = ("kl", "top1_agreement", "rouge_l", "teacher_logprob", "reference_accuracy")
EXTRA = ("steps", "speedup_batch1", "speedup_batched")  # aggregated where the run has them


def child(recipe: str, seed: int, budget: str) -> dict:
    import torch

    from distill import pipeline
    from distill.config import duration_seconds, load_config
    from distill.data import prompt_token_ids
    from distill.evaluate import compare_speed, evaluate_model
    from distill.generate import read_answers
    from distill.hardware import DTYPES
    from distill.models import load_model, load_tokenizer

    task_budget = duration_seconds(budget) - (
        duration_seconds(HEAL_SHARE[recipe]) if recipe in HEAL_SHARE else 0
    )
    overrides = [f"name=bench-quality-{recipe}-s{seed}", f"train.time_budget={task_budget:.0f}s",
                 f"train.seed={seed}", "train.max_steps=100000", "train.checkpoint_every=100000",
                 *BASE, *RECIPES[recipe]]  # fmt: skip
    cfg, _ = pipeline.prepare(load_config(None, overrides))
    pipeline.shrink(cfg)
    t0 = time.perf_counter()
    pipeline.train_student(cfg, resume=False)
    train_s = time.perf_counter() - t0
    run = cfg.run_dir
    summary = json.loads((run / "train_summary.json").read_text())
    heal_steps = summary.get("heal", {}).get("steps", 0)
    tok = load_tokenizer(cfg.teacher.model)
    _, held = pipeline.load_split(cfg)
    ids = {p.id: prompt_token_ids(tok, p, max_tokens=cfg.data.max_prompt_tokens) for p in held}
    teacher = load_model(cfg.teacher.model)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    answers = read_answers(run / "answers.jsonl")
    res, _ = evaluate_model("student", student, teacher, tok, held, ids, answers, cfg.evaluate,
                            weights_dir=run / "student", max_seq_len=cfg.train.max_seq_len)  # fmt: skip
    out = {m: res.get(m) for m in METRICS}
    # generation speed-up over the teacher, in the precision the run chose, side by side
    speed_cfg = cfg.evaluate.model_copy(update={"speed_new_tokens": 32, "speed_repeats": 2})
    speed_rows = list(ids.values())[:8]
    speeds = compare_speed({"teacher": teacher, "student": student}, tok, speed_rows, speed_cfg,
                           DTYPES[cfg.evaluate.speed_dtype])  # fmt: skip
    for key in ("tokens_per_s_batch1", "tokens_per_s_batched"):
        out[f"speedup_{key.removeprefix('tokens_per_s_')}"] = speeds["student"][key] / speeds["teacher"][key]
    out["params"] = sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())
    out.update(steps=summary["steps"], heal_steps=heal_steps, train_seconds=train_s, layers=json.loads(
        (run / "student_init" / "layer_map.json").read_text())["teacher_layers"])  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="3m", help="training wall-clock per recipe")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--source", default="runs/default", help="a run folder with answers.jsonl and split.json")
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "SEED"))
    ap.add_argument("--append", action="store_true", help="add to the runs already in the results file")
    ap.add_argument("--summarise", action="store_true", help="no runs: recompute the table and keys")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.budget)))
        return
    source = Path(args.source)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    raw: dict[str, list[dict]] = {r: [] for r in recipes}
    commands: list[str] = []
    if (args.append or args.summarise) and RESULTS.is_file():
        before = json.loads(RESULTS.read_text())
        for r, runs in before["raw"].items():
            raw.setdefault(r, []).extend(runs)
        commands = before.get("commands") or [before["command"]]
    if args.summarise:
        seeds = []  # no runs: the table and keys again, from the runs recorded
    else:
        commands.append("python bench/quality.py " + " ".join(sys.argv[1:]))
    for seed in seeds:
        for recipe in recipes:  # the recipes take turns within a seed: a slow spell hits all alike
            run = Path("runs") / f"bench-quality-{recipe}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            for f in ("answers.jsonl", "split.json"):
                shutil.copy(source / f, run / f)
            cmd = [sys.executable, __file__, "--child", recipe, str(seed), "--budget", args.budget]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{recipe} seed {seed} failed:\n{done.stderr[-3000:]}")
            raw.setdefault(recipe, []).append(json.loads(line[7:]) | {"seed": seed})
            print(recipe, seed, raw[recipe][-1], flush=True)

    def agg(recipe: str, m: str) -> dict:
        vals = [r[m] for r in raw[recipe] if r.get(m) is not None]
        return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else {}

    recipes = [r for r in RECIPES if raw.get(r)]
    table = {r: {m: agg(r, m) for m in (*METRICS, *EXTRA)} | {"runs": len(raw[r])} for r in recipes}
    kl = {r: table[r]["kl"]["mean"] for r in recipes}
    best = min(kl, key=kl.get)
    gains = {
        on: table[on]["teacher_logprob"]["mean"] - table[off]["teacher_logprob"]["mean"]
        for on, off in OFF_POLICY_TWIN.items()
        if on in table and off in table
    }
    result = {
        "best_recipe": best,
        "best_vs_default_heldout_kl_ratio": kl[best] / kl["default"] if "default" in kl else None,
        "new_default_recipe": NEW_DEFAULT,
        "default_heldout_top1_agreement": table.get(NEW_DEFAULT, {}).get("top1_agreement", {}).get("mean"),
        "old_default_heldout_top1_agreement": table.get("default", {}).get("top1_agreement", {}).get("mean"),
        "new_default_speedup_batch1": table.get(NEW_DEFAULT, {}).get("speedup_batch1", {}).get("mean"),
        "onpolicy_vs_offpolicy_teacher_logprob_gain": max(gains.values()) if gains else None,
        "onpolicy_gains_by_recipe": gains,
        "table": table,
        "raw": raw,
        "budget": args.budget,
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")
            ),
            "?",
        ),  # fmt: skip
        "seeds": sorted({x["seed"] for runs in raw.values() for x in runs}),
        "commands": commands,
        "date": dt.date.today().isoformat(),
    }
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw", "table")}, indent=1))


if __name__ == "__main__":
    main()
