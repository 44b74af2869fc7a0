"""The cross-tokenizer ratio again, on prompts that chose nothing: 40 prompts from other domains.

    python bench/crosstok_confirm.py     # after bench/crosstok.py; ~3 min

bench/crosstok.py picks the best logit run and the best text-only run out of many settings, each
scored on the same 32 held-out prompts, so its ratio carries some selection. Here they are scored
again on prompts that chose nothing: the teacher's answers to the 40 prompts of
``bench/data/ood_prompts.jsonl`` (news, reviews, e-mail, everyday questions, work, health, travel,
8 HumanEval problems), whose domains no student trained on. The logit side is the run bench/crosstok.py
picked (key ``best_logit_method``); the text alone's side is the best, on these prompts, of every
text-only student still in its run folder with at most as many steps (a choice in its favour). The
untrained student and the teacher are scored too. The teacher samples its answers as in
bench/crosstok.py (same generation settings and seed, in float32; cached under
runs/bench-crosstok-confirm/). Figures: crosstok.json, key ``confirm``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from crosstok import RESULTS, ROOT, bits_per_byte, named_run  # noqa: E402

PROMPTS = ROOT / "bench" / "data" / "ood_prompts.jsonl"


def main() -> None:
    from distill.core.data import read_prompts
    from distill.core.hardware import cpu_model
    from distill.core.models import load_model, load_tokenizer, resolve_model_dir
    from distill.core.recipe import load_config
    from distill.evaluate.intervals import bootstrap
    from distill.teacher.generate import generate_answers

    whole = json.loads(RESULTS.read_text())
    best, methods = whole["best_logit_method"], whole["methods"]
    folder = lambda m: ROOT / "runs" / named_run("sampled", m)  # noqa: E731
    if "@" in best or not (folder(best) / "student").is_dir():
        sys.exit(f"{best}: its final student is not in {folder(best)}; run bench/crosstok.py for it again")
    # the text alone: every final text-only student still on disk of at most as many steps, its best
    # chosen on these prompts (in its favour; its checkpoints are not kept)
    text = [m for m in methods if m.startswith("seqkd") and methods[m]["steps"] <= methods[best]["steps"]
            and (folder(m) / "student").is_dir()]  # fmt: skip
    if not text:
        sys.exit("no text-only student on disk: run python bench/crosstok.py --methods seqkd --append")
    runs = {m: folder(m) for m in (best, *text)}
    cfg = load_config(runs[best] / "config.yaml")
    prompts = read_prompts(PROMPTS)
    answers = ROOT / "runs" / "bench-crosstok-confirm" / "answers.jsonl"
    tok = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model)  # float32
    generate_answers(teacher, tok, prompts, answers, cfg.generate, system_prompt=cfg.data.system_prompt,
                     max_prompt_tokens=cfg.data.max_prompt_tokens)  # fmt: skip
    del teacher
    other = (prompts, answers)
    scored = {
        "teacher": bits_per_byte(resolve_model_dir(cfg.teacher.model), cfg, other=other),
        "untrained_student": bits_per_byte(runs[best] / "student_init", cfg, other=other),
        **{m: bits_per_byte(run / "student", cfg, other=other) for m, run in runs.items()},
    }
    for m, r in scored.items():
        print(f"{m}: bits per byte {r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}]")
    base = min(text, key=lambda m: scored[m]["value"])
    cols = {"b": np.array(scored[best]["per_prompt_nats"]), "s": np.array(scored[base]["per_prompt_nats"])}
    ci = bootstrap(lambda c: float(np.sum(c["b"]) / np.sum(c["s"])), cols)
    whole["confirm"] = {
        "prompts": len(prompts),
        "file": str(PROMPTS.relative_to(ROOT)),
        "best_logit_method": best,
        "best_seqkd": base,
        "models": scored,
        "logit_vs_seqkd_bits_per_byte_ratio": round(scored[best]["value"] / scored[base]["value"], 4),
        "ratio_interval": [round(ci.low, 4), round(ci.high, 4)],
        "cpu": cpu_model(),
        "command": " ".join(["python", *sys.argv]),
        "date": dt.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    RESULTS.write_text(json.dumps(whole, indent=1))
    c = whole["confirm"]
    print(f"ratio {c['logit_vs_seqkd_bits_per_byte_ratio']} {c['ratio_interval']} on {c['prompts']} prompts")


if __name__ == "__main__":
    main()
