"""How do trained students do on prompts from other domains? Out-of-domain quality per recipe.

    python bench/ood.py [--speed] [--append] RUN_DIR ...   # runs of bench/quality.py (bench-quality-*)

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
RESULTS = HERE / "results" / "ood.json"
METRICS = ("kl", "top1_agreement", "rouge_l", "teacher_logprob")
SPEED = ("speedup_batch1", "speedup_batched")


def main() -> None:
    from transformers import AutoModelForCausalLM

    from distill.config import EvaluateConfig
    from distill.data import prompt_token_ids, read_prompts
    from distill.evaluate import compare_speed, evaluate_model
    from distill.generate import answer_key, generate_batch, read_answers, write_records
    from distill.hardware import DTYPES
    from distill.models import load_model, load_tokenizer

    speed, append = "--speed" in sys.argv, "--append" in sys.argv
    runs = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    prompts = read_prompts(PROMPTS)
    teacher = load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    ids = {p.id: prompt_token_ids(tok, p) for p in prompts}
    cache = Path("runs/bench-ood/answers.jsonl")
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        recs = []
        with torch.no_grad():
            for i in range(0, len(prompts), 8):
                chunk = prompts[i : i + 8]
                gens = generate_batch(teacher, tok, [ids[p.id] for p in chunk], max_new_tokens=64)  # fp32
                for p, g in zip(chunk, gens, strict=True):
                    text = tok.decode(g.token_ids, skip_special_tokens=True)
                    recs.append(
                        {"id": p.id, "text": text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
                    )
        with cache.open("w") as f:
            write_records(f, recs)
    answers = read_answers(cache)
    assert all(answer_key(p.id) in answers for p in prompts)
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
