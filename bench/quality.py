"""The shipped default recipe and its nearest alternatives, chosen on validation, reported on test.

    python bench/quality.py [--recipes default,lr_6e-4,...] [--source runs/default] [--budget 6m]

Needs the default run (``make demo``): its teacher answers, its split and its untrained student.
Every candidate starts from the same untrained student (``student_init/`` of the source run), learns
from the same teacher answers to the same training prompts for the same wall-clock as the shipped
recipe (``train.time_budget`` of src/distill/recipes/default.yaml unless ``--budget``), each in
its own process, and is then scored on two fixed prompt sets (tools/build_quality_splits.py):

- ``bench/data/quality_validation_prompts.jsonl``: 32 prompts of the same sources as the embedded
  set's first rows, kept out of the embedded set (the source run must not train on any of them).
  Earlier recipe searches (bench/results/quality_search.json) were compared on these; here they
  choose the best candidate and nothing else.
- ``bench/data/quality_test_prompts.jsonl``: 32 fresh prompts of the same sources, which nothing
  was chosen on. Every figure reported as a ``*_test_*`` key comes from these; the teacher's greedy
  answers to them are generated once into ``runs/bench-quality-test``.

Per prompt: KL(teacher || student) and top-1 agreement teacher-forced on the teacher's answers,
ROUGE-L of the student's greedy answer against the teacher's, and the teacher's mean log-prob per
token of the student's own answer. Intervals are 95% percentile bootstraps over prompts; a
comparison of two candidates resamples the same prompts for both (paired).

Keys written to bench/results/quality.json: ``selection`` ("validation"), ``default_test_kl``,
``default_test_top1_agreement``, ``best_on_validation``, ``best_on_validation_vs_default_test_kl_ratio``,
``onpolicy_vs_offpolicy_teacher_logprob_gain`` (on test), ``default_speedup_batch1``, and a table of
every candidate on both splits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

from distill.core.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quality.json"
VALIDATION = ROOT / "bench" / "data" / "quality_validation_prompts.jsonl"
TEST = ROOT / "bench" / "data" / "quality_test_prompts.jsonl"
TEST_RUN = "bench-quality-test"
# Overrides on the shipped recipe; "default" is the recipe itself.
RECIPES: dict[str, list[str]] = {
    "default": [],
    "lr_6e-4": ["train.lr=6.0e-4"],  # the learning rate before the default's
    "onpolicy_0.5": ["train.onpolicy_fraction=0.5"],  # half the steps on the student's own samples
    "no_hidden_prompt": [
        "train.hidden_weight=0",
        "train.prompt_weight=0",
    ],  # what a cache or API teacher allows
}
ONPOLICY_TWIN = ("onpolicy_0.5", "default")
METRICS = ("kl", "top1_agreement", "rouge_l", "teacher_logprob")
FIELDS = ("kl", "agree", "ce", "tokens", "rouge_l", "judge_logprob", "judge_tokens")


def test_answers() -> Path:
    """The teacher's greedy answers to the test prompts, generated once."""
    from distill import pipeline
    from distill.core.recipe import load_config

    cfg = load_config(None, [f"name={TEST_RUN}", f"data.path={TEST}", "data.heldout_size=1"])
    pipeline.generate(cfg)
    return cfg.run_dir / "answers.jsonl"


def validation_answers(teacher, tok) -> Path:
    """The teacher's greedy answers to the validation prompts (fp32, 64 tokens), generated once; the
    same cache bench/choice.py uses."""
    sys.path.insert(0, str(ROOT / "bench"))
    from ood import teacher_answers

    from distill.core.data import prompt_token_ids, read_prompts

    prompts = read_prompts(VALIDATION)
    cache = ROOT / "runs" / "bench-choice-validation" / "answers.jsonl"
    teacher_answers(prompts, teacher, tok, {p.id: prompt_token_ids(tok, p) for p in prompts}, cache)
    return cache


def _score(cfg, student, teacher, tok, prompts_file: Path, answers_file: Path) -> list[dict]:
    from distill.core.answers import read_answers
    from distill.core.data import prompt_token_ids, read_prompts
    from distill.evaluate.metrics import evaluate_model

    prompts = read_prompts(prompts_file)
    ids = {p.id: prompt_token_ids(tok, p, max_tokens=cfg.data.max_prompt_tokens) for p in prompts}
    res, _ = evaluate_model("student", student, teacher, tok, prompts, ids, read_answers(answers_file),
                            cfg.evaluate, weights_dir=None, max_seq_len=cfg.train.max_seq_len)  # fmt: skip
    return [{k: r[k] for k in ("id", *FIELDS)} for r in res["per_prompt"]]


def child(recipe: str, budget: str | None) -> dict:
    from candidates import student_and_teacher, train_candidate

    from distill.core.data import prompt_token_ids, read_prompts
    from distill.core.hardware import DTYPES
    from distill.evaluate.metrics import compare_speed

    overrides = [f"name=bench-quality-{recipe}", *RECIPES[recipe]]
    overrides += [f"train.time_budget={budget}"] if budget else []
    cfg, summary, train_s = train_candidate(overrides)
    run = cfg.run_dir
    student, teacher, tok = student_and_teacher(cfg, run)
    out = {
        "validation": _score(cfg, student, teacher, tok, VALIDATION, validation_answers(teacher, tok)),
        "test": _score(cfg, student, teacher, tok, TEST, ROOT / "runs" / TEST_RUN / "answers.jsonl"),
    }
    # generation speed-up over the teacher, in the precision the run chose, side by side
    val = read_prompts(VALIDATION)[:8]
    rows = [prompt_token_ids(tok, p, max_tokens=cfg.data.max_prompt_tokens) for p in val]
    speed_cfg = cfg.evaluate.model_copy(update={"speed_new_tokens": 32, "speed_repeats": 2})
    speeds = compare_speed({"teacher": teacher, "student": student}, tok, rows, speed_cfg,
                           DTYPES[cfg.evaluate.speed_dtype])  # fmt: skip
    out["speedup_batch1"] = (
        speeds["student"]["tokens_per_s_batch1"] / speeds["teacher"]["tokens_per_s_batch1"]
    )
    out.update(steps=summary["steps"], train_seconds=train_s, overrides=overrides)
    return out


def _columns(raw: dict, split: str) -> dict:
    """``<recipe>:<field>`` columns over the split's prompts, aligned by prompt id (paired)."""
    import numpy as np

    ids = [r["id"] for r in next(iter(raw.values()))[split]]
    cols = {}
    for recipe, res in raw.items():
        by_id = {r["id"]: r for r in res[split]}
        for f in FIELDS:
            vals = [by_id[i][f] for i in ids]
            cols[f"{recipe}:{f}"] = np.array([np.nan if v is None else v for v in vals], dtype=float)
    return cols


def summarise(raw: dict, budget: str | None, commands: list[str]) -> dict:
    from distill.evaluate.intervals import bootstrap, metric

    def interval(stat, cols) -> dict:
        return bootstrap(stat, cols).as_dict()

    cols = {s: _columns(raw, s) for s in ("validation", "test")}
    table = {
        r: {s: {m: interval(metric(m, r), cols[s]) for m in METRICS} for s in cols}
        | {"steps": raw[r]["steps"], "speedup_batch1": raw[r]["speedup_batch1"]}
        for r in raw
    }
    best = min(raw, key=lambda r: table[r]["validation"]["kl"]["value"])
    kl_best, kl_default = metric("kl", best), metric("kl", "default")
    ratio = interval(lambda c: kl_best(c) / kl_default(c), cols["test"])
    gain = None
    if all(r in raw for r in ONPOLICY_TWIN):
        on, off = (metric("teacher_logprob", r) for r in ONPOLICY_TWIN)
        gain = interval(lambda c: on(c) - off(c), cols["test"])
    return {
        "selection": "validation",
        "default_test_kl": table["default"]["test"]["kl"],
        "default_test_top1_agreement": table["default"]["test"]["top1_agreement"],
        "default_validation_kl": table["default"]["validation"]["kl"],
        "default_validation_top1_agreement": table["default"]["validation"]["top1_agreement"],
        "best_on_validation": best,
        "best_on_validation_vs_default_test_kl_ratio": ratio,
        "onpolicy_vs_offpolicy_teacher_logprob_gain": gain,
        "default_speedup_batch1": raw["default"]["speedup_batch1"],
        "candidates": {r: RECIPES[r] for r in raw},
        "table": table,
        "raw": raw,
        "budget": budget or "the recipe's train.time_budget",
        "splits": {"validation": str(VALIDATION.relative_to(ROOT)), "test": str(TEST.relative_to(ROOT))},
        "cpu": cpu_model(),
        "commands": commands,
        "date": dt.date.today().isoformat(),
    }


def _norm(text: str) -> str:
    """Lower case, runs of non-word characters as one space: how prompts are compared."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def check_not_trained_on(source: Path) -> None:
    """Stop if a validation prompt, by id or by text, is among the source run's training prompts."""
    from distill.core.data import read_prompts

    def texts(prompts) -> set[str]:
        return {_norm(m["content"]) for p in prompts for m in p.messages if m["role"] == "user"}

    train = set(json.loads((source / "split.json").read_text())["train"])
    validation = read_prompts(VALIDATION)
    same_ids = train & {p.id for p in validation}
    if same_ids:
        raise SystemExit(f"{source} trained on validation prompts: {sorted(same_ids)[:5]}")
    embedded_train = [p for p in read_prompts(None) if p.id in train]
    same_texts = texts(embedded_train) & texts(validation)
    if same_texts:
        raise SystemExit(f"{source} trained on validation prompts: {sorted(same_texts)[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--source", default="runs/default", help="the default run: answers, split, student_init")
    ap.add_argument(
        "--budget", default=None, help="training wall-clock per candidate (default: the recipe's)"
    )
    ap.add_argument("--child", metavar="RECIPE")
    ap.add_argument("--append", action="store_true", help="keep the candidates already recorded")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.budget)))
        return
    source = Path(args.source)
    check_not_trained_on(source)
    from candidates import run_child, seed_run

    raw, commands = {}, []
    if args.append and RESULTS.is_file():
        before = json.loads(RESULTS.read_text())
        raw, commands = before["raw"], before["commands"]
    commands.append("python bench/quality.py " + " ".join(sys.argv[1:]))
    test_answers()
    for recipe in args.recipes.split(","):
        seed_run(ROOT / "runs" / f"bench-quality-{recipe}", source, ("answers.jsonl", "split.json"))
        raw[recipe] = run_child(
            __file__, ["--child", recipe] + (["--budget", args.budget] if args.budget else []), recipe
        )
        print(recipe, {k: raw[recipe][k] for k in ("steps", "speedup_batch1")}, flush=True)
        result = summarise(raw, args.budget, commands) if "default" in raw else None
        if result:
            RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw", "table")}, indent=1))


if __name__ == "__main__":
    main()
