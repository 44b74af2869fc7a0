"""How do trained students do on prompts from other domains? Out-of-domain quality.

    python bench/ood.py --default runs/default            # the shipped default after `make demo`: test split
    python bench/ood.py [--speed] [--append] RUN_DIR ...   # runs of bench/quality.py (bench-quality-*)

``--default RUN`` scores the run folder of a `make demo` (the shipped default recipe) on the
other-domain *test* split, which no choice was made on: 48 open prompts of other domains
(``bench/data/ood_test_prompts.jsonl``: cooking, customer support, science, finance, history,
geography, sports, product copy, rewriting, extraction, formats, brief answers, advice) and 40
labelling items with reference labels and choices (``bench/data/ood_test_labels.jsonl``:
sentiment, topic, spam, urgency, animal or plant), all written for this benchmark. The teacher
answers the open prompts once (greedy, 64 tokens, as the recipe generates; cached under
runs/bench-ood-test/); KL and top-1 agreement are teacher-forced on those answers, as in eval.json,
with 95% bootstrap intervals over prompts; on the labelling items each model answers greedily and
is right when it names the reference label and no other choice; the kept share is the student's
accuracy over the teacher's, with its paired interval over items. The `make demo` wall time is
read from bench/results/demo.json (the same machine when both were run in one session: the CPU
model is recorded beside each). Figures go to bench/results/ood.json (``default_ood_test_*``).

The per-recipe mode:

The students of ``bench/quality.py`` learn from the teacher's answers to the embedded prompt set
(small talk, arithmetic, Python documentation). Here each is scored on 40 prompts from elsewhere
(``bench/data/ood_prompts.jsonl``): news, reviews, e-mail, everyday questions, work, health,
travel, written for this benchmark, and 8 HumanEval problems (MIT). The teacher answers them once
(greedy, 64 tokens; cached under runs/bench-ood/); every student is then scored as in
``bench/quality.py``: KL and top-1 agreement teacher-forced on those answers, ROUGE-L of its own
greedy answers, and the teacher's log-prob of them; with ``--speed`` (on a quiet machine) also the
student's generation speed-up over the teacher (batch 1 and batch 8, side by side, in the precision
the run chose). Figures go to bench/results/ood.json, by recipe (the run folder's name without its
seed).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
PROMPTS = HERE / "data" / "ood_prompts.jsonl"
TEST_PROMPTS = HERE / "data" / "ood_test_prompts.jsonl"
TEST_LABELS = HERE / "data" / "ood_test_labels.jsonl"
TARGETS = {"kl": ("<=", 2.0), "top1_agreement": (">=", 0.45), "task_accuracy_kept": (">=", 0.7)}
RESULTS = HERE / "results" / "ood.json"
METRICS = ("kl", "top1_agreement", "rouge_l", "teacher_logprob")
SPEED = ("speedup_batch1", "speedup_batched")


def target_met(key: str, value: float, low: float, high: float) -> dict:
    """Whether the figure meets its target (``_met``, the point estimate) and whether its whole 95%
    interval does (``_met_on_interval``): a figure on the right side of a target its interval
    straddles could land on either side in another run."""
    op, target = TARGETS[key]
    ok = (lambda x: x <= target) if op == "<=" else (lambda x: x >= target)
    worst = high if op == "<=" else low
    return {f"default_ood_test_{key}_met": ok(value), f"default_ood_test_{key}_met_on_interval": ok(worst)}


def teacher_answers(prompts, teacher, tok, ids, cache: Path) -> dict:
    """The teacher's greedy answers (64 tokens, fp32), generated once and kept in ``cache``."""
    from distill.core.answers import answer_key, read_answers, write_records
    from distill.core.generation import generate_batch

    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        recs = []
        with torch.no_grad():
            for i in range(0, len(prompts), 8):
                chunk = prompts[i : i + 8]
                gens = generate_batch(teacher, tok, [ids[p.id] for p in chunk], max_new_tokens=64)
                for p, g in zip(chunk, gens, strict=True):
                    text = tok.decode(g.token_ids, skip_special_tokens=True)
                    recs.append(
                        {"id": p.id, "text": text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
                    )
        with cache.open("w") as f:
            write_records(f, recs)
    answers = read_answers(cache)
    assert all(answer_key(p.id) in answers for p in prompts)
    return answers


def score_default(run: Path) -> None:
    """The shipped default (a `make demo` run folder) on the other-domain test split -> ood.json."""
    from transformers import AutoModelForCausalLM

    from distill.core.data import prompt_token_ids, read_prompts
    from distill.core.hardware import cpu_model
    from distill.core.models import load_model, load_tokenizer
    from distill.core.recipe import load_config
    from distill.evaluate.intervals import quality_intervals
    from distill.evaluate.metrics import evaluate_model
    from distill.evaluate.tasks import evaluate_tasks

    cfg = load_config(run / "config.yaml", [f"evaluate.tasks=[{TEST_LABELS}]", "evaluate.task_size=null"])
    prompts = read_prompts(TEST_PROMPTS)
    teacher = load_model(cfg.teacher.model)  # fp32: the reference, as in eval.json
    tok = load_tokenizer(cfg.teacher.model)
    ids = {p.id: prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt) for p in prompts}
    answers = teacher_answers(prompts, teacher, tok, ids, Path("runs/bench-ood-test/answers.jsonl"))
    models = {"teacher": teacher}
    for name, folder in (("untrained_student", run / "student_init"), ("student", run / "student")):
        models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    per_prompt = {}
    for name, model in models.items():
        res, _ = evaluate_model(name, model, teacher, tok, prompts, ids, answers, cfg.evaluate,
                                weights_dir=None, max_seq_len=cfg.train.max_seq_len,
                                reference_answers=name == "teacher")  # fmt: skip
        per_prompt[name] = res["per_prompt"]
    iv = quality_intervals(
        per_prompt, draws=cfg.evaluate.bootstrap_draws, metrics=("kl", "top1_agreement", "rouge_l")
    )
    tasks, task_answers = evaluate_tasks(models, tok, cfg)
    labels = tasks[TEST_LABELS.stem]["intervals"]
    demo = json.loads((HERE / "results" / "demo.json").read_text())
    figures = {
        "kl": iv["models"]["student"]["kl"],
        "top1_agreement": iv["models"]["student"]["top1_agreement"],
        "task_accuracy_kept": labels["kept"]["reference_accuracy"],
    }
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for key, ci in figures.items():
        op, target = TARGETS[key]
        out[f"default_ood_test_{key}"] = ci["value"]
        out[f"default_ood_test_{key}_interval"] = [ci["low"], ci["high"]]
        out[f"default_ood_test_{key}_target"] = f"{op} {target}"
        out |= target_met(key, ci["value"], ci["low"], ci["high"])
    out["default_ood_test"] = {
        "run": str(run),
        "open_prompts": len(prompts),
        "labelling_items": tasks[TEST_LABELS.stem]["items"],
        "intervals": iv,
        "labels": tasks[TEST_LABELS.stem],
        "label_answers": task_answers,
        "make_demo_wall_minutes": demo.get("wall_min"),
        "make_demo_cpu": demo.get("cpu"),
        "cpu": cpu_model(),
        "command": f"python bench/ood.py --default {run}",
        "date": dt.date.today().isoformat(),
    }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    for key in figures:
        met = "met" if out[f"default_ood_test_{key}_met"] else "MISSED"
        whole = "and" if out[f"default_ood_test_{key}_met_on_interval"] else "but not"
        figure, interval = out[f"default_ood_test_{key}"], out[f"default_ood_test_{key}_interval"]
        print(key, figure, interval, met, f"({whole} on its whole interval)")
    for m, ci in labels["models"].items():
        print(f"label accuracy {m}: {ci['reference_accuracy']['value']:.3f}")


def main() -> None:
    from transformers import AutoModelForCausalLM

    from distill.core.config import EvaluateConfig
    from distill.core.data import prompt_token_ids, read_prompts
    from distill.core.hardware import DTYPES
    from distill.core.models import load_model, load_tokenizer
    from distill.evaluate.metrics import compare_speed, evaluate_model

    if "--default" in sys.argv:
        score_default(Path(sys.argv[sys.argv.index("--default") + 1]))
        return
    speed, append = "--speed" in sys.argv, "--append" in sys.argv
    runs = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    prompts = read_prompts(PROMPTS)
    teacher = load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    ids = {p.id: prompt_token_ids(tok, p) for p in prompts}
    answers = teacher_answers(prompts, teacher, tok, ids, Path("runs/bench-ood/answers.jsonl"))
    cfg = EvaluateConfig(max_new_tokens=64)
    raw: dict[str, list[dict]] = {}
    if append and RESULTS.is_file():  # keep the runs scored before, but for those scored again now
        again = {r.name for r in runs}
        for recipe, rs in json.loads(RESULTS.read_text())["raw"].items():
            raw[recipe] = [x for x in rs if x["run"] not in again]
    for run in runs:
        student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
        res, _ = evaluate_model("student", student, teacher, tok, prompts, ids, answers, cfg,
                                weights_dir=run / "student", max_seq_len=384)  # fmt: skip
        recipe = re.sub(r"^bench-quality-|-s\d+$", "", run.name)
        out = {m: res.get(m) for m in METRICS} | {"run": run.name}
        if not speed:
            raw.setdefault(recipe, []).append(out)
            print(recipe, out, flush=True)
            continue
        # generation speed-up over the teacher, side by side, in the dtype the run chose for speed
        speed_dtype = json.loads((run / "precision.json").read_text())["speed"]["dtype"]
        speed_cfg = cfg.model_copy(update={"speed_new_tokens": 32, "speed_repeats": 2})
        rows = list(ids.values())[:8]
        speeds = compare_speed(
            {"teacher": teacher, "student": student}, tok, rows, speed_cfg, DTYPES[speed_dtype]
        )
        for key in ("tokens_per_s_batch1", "tokens_per_s_batched"):
            out[f"speedup_{key.removeprefix('tokens_per_s_')}"] = (
                speeds["student"][key] / speeds["teacher"][key]
            )
        raw.setdefault(recipe, []).append(out)
        print(recipe, raw[recipe][-1], flush=True)
    raw = {r: rs for r, rs in raw.items() if rs}
    table = {
        r: {m: {"mean": statistics.fmean(x[m] for x in rs), "min": min(x[m] for x in rs),
                "max": max(x[m] for x in rs)} for m in (*METRICS, *SPEED) if m in rs[0]} | {"runs": len(rs)}
        for r, rs in raw.items()
    }  # fmt: skip
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    RESULTS.write_text(json.dumps({"table": table, "raw": raw, "prompts": len(prompts), "cpu": cpu,
                                   "command": "python bench/ood.py " + " ".join(sys.argv[1:]),
                                   "date": dt.date.today().isoformat()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
