"""Across tokenizers: Gemma 3 270M teaches SmolLM2-135M-Instruct. Which signal helps the student most?

    python bench/crosstok.py [--steps 60] [--methods seqkd,uld,span] [--lr 1e-4] [--alpha 0.5]
    python bench/crosstok.py --methods span --alpha 0.2 --append   # one more, on the same answers
    python bench/crosstok.py --answers greedy                      # the teacher's greedy answers

The teacher (`gemma3-270m`, vocabulary 262,144, a base model) answers the embedded prompt set once,
by default sampling at temperature 1 from its whole distribution; every method then trains a copy
of SmolLM2-135M-Instruct (vocabulary 49,152) on the same answers for the same number of steps:

- ``seqkd``: sequence-level KD, the teacher's answers as text in the student's tokens (train.alpha 0);
- ``uld``: Universal Logit Distillation beside the CE (train.cross_tokenizer uld, alpha 0.5);
- ``span``: alignment by character spans beside the CE (train.cross_tokenizer span, alpha 0.5).

Each student, the untrained one and the teacher itself are scored on the 32 held-out prompts by the
bits per byte of the teacher's answers under it (cross-entropy per byte of text: no tokenizer enters
it), with a 95% bootstrap interval over the prompts. On sampled answers this estimates the
cross-entropy from the teacher's distribution to the student's, which the teacher's own figure
bounds from below; on greedy answers (``--answers greedy``, kept under the key ``greedy``) the
teacher itself is no floor: a student fitted to the argmax path scores below it. Figures:
bench/results/crosstok.json, key ``logit_vs_seqkd_bits_per_byte_ratio`` (the best logit method /
sequence-level KD, on sampled answers; target <= 0.97).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "crosstok.json"
METHODS = {
    "seqkd": ["train.alpha=0"],
    "uld": ["train.cross_tokenizer=uld"],
    "span": ["train.cross_tokenizer=span"],
}


def key(
    method: str, alpha: float, topk: int = 128, lr: float = 1e-4, steps: int = 60, onpolicy: float = 0,
    cached: bool = False, chunk: str = "bernoulli", chain: bool = True,
) -> str:  # fmt: skip
    """A run's name in the results: the method, and its alpha, top-k, on-policy share, lr and steps
    where they are not 0.5, 128, 0, 1e-4 and 60, whether the teacher's signal came from a cache, how
    span taught chunks of several tokens where not by the Bernoulli KL, and ``_chain`` for span since
    it gives a distribution to every position of a chunk the teacher reads as one token
    (``crosstok.piece_rows``; the runs without it had one at one-to-one chunks only)."""
    out = method if method == "seqkd" else (
        method + ("" if alpha == 0.5 else f"_alpha{alpha:g}") + ("" if topk == 128 else f"_top{topk}")
        + (f"_onpolicy{onpolicy:g}" if onpolicy else "") + ("" if chunk == "bernoulli" else f"_chunk{chunk}")
        + ("_cached" if cached else "") + ("_chain" if chain and method == "span" else "")
    )  # fmt: skip
    return out + ("" if lr == 1e-4 else f"_lr{lr:g}") + ("" if steps == 60 else f"_steps{steps}")


def base(args) -> list[str]:
    return ["teacher.model=gemma3-270m", "student.init=model", "student.model=smollm2-135m-instruct",
            "data.heldout_size=32", "generate.max_new_tokens=64", f"train.max_steps={args.steps}",
            "train.time_budget=null", f"train.lr={args.lr}", "train.warmup_steps=5", "train.hidden_weight=0",
            "train.prompt_weight=0", "train.batch_size=8", "train.checkpoint_every=1000",
            f"train.cross_topk={args.topk}", "evaluate.tasks=[]"]  # fmt: skip


def held_out(tok, cfg, other: tuple[list, Path] | None = None) -> list[tuple[list[int], list[int], dict]]:
    """The teacher's answers to the held-out prompts in ``tok``'s tokens, as every score here reads
    them: (prompt ids, answer ids cut to fit train.max_seq_len as training cuts them, the record).
    ``other``: (prompts, their answers.jsonl) instead of the run's held-out prompts and answers."""
    from distill.core.answers import answer_key, read_answers
    from distill.core.data import make_example, prompt_token_ids, student_answer_ids
    from distill.pipeline import load_split

    prompts, path = other if other is not None else (load_split(cfg)[1], cfg.run_dir / "answers.jsonl")
    answers = read_answers(path)
    out = []
    for p in prompts:
        rec = answers[answer_key(p.id)]
        ids = prompt_token_ids(
            tok, p, system_prompt=cfg.data.system_prompt, max_tokens=cfg.data.max_prompt_tokens
        )
        ans = student_answer_ids(tok, rec["text"], rec.get("finish_reason") == "stop")
        full, mask = make_example(ids, ans, cfg.train.max_seq_len)
        out.append((ids, [i for i, m in zip(full, mask, strict=True) if m], rec))
    return out


def bits_per_byte(
    folder: Path, cfg, draws: int = 2000, weights: Path | None = None, other: tuple[list, Path] | None = None
) -> dict:
    """Bits per byte of the teacher's held-out answers under the model in ``folder`` (its tokens), or
    under the weights of a training checkpoint ``weights`` (a safetensors file) in that architecture;
    ``other``: of the answers to other prompts (see ``held_out``)."""
    from transformers import AutoModelForCausalLM

    from distill.core.data import make_example
    from distill.core.models import load_tokenizer
    from distill.evaluate.intervals import bootstrap, ratio_of_sums
    from distill.evaluate.metrics import forced_metrics

    tok = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    examples, sizes = [], []
    for ids, ans, _ in held_out(tok, cfg, other):
        examples.append(make_example(ids, ans, cfg.train.max_seq_len))
        sizes.append(len(tok.decode(ans, skip_special_tokens=True).encode()))
    rows = forced_metrics(model, None, examples, tok.pad_token_id, 8)["per_example"]
    cols = {"m:ce": np.array([r["ce"] for r in rows]), "m:bytes": np.array(sizes, dtype=float)}
    ci = bootstrap(ratio_of_sums("m:ce", "m:bytes"), cols, draws=draws)
    scale = 1 / math.log(2)
    return {"value": ci.value * scale, "low": ci.low * scale, "high": ci.high * scale, "prompts": len(rows),
            "per_prompt_nats": [r["ce"] for r in rows], "per_prompt_bytes": sizes}  # fmt: skip


ANSWERS = {
    "sampled": ["generate.do_sample=true", "generate.generation_temperature=1.0", "generate.top_p=1.0"],
    "greedy": [],
}


def run_name(answers: str, method: str, *args) -> str:
    return named_run(answers, key(method, *args))


def named_run(answers: str, name: str) -> str:
    """The run folder's name of the run recorded as ``name`` (a key of ``methods``)."""
    return f"bench-crosstok-{'sampled-' if answers == 'sampled' else ''}{name}"


def ratio(section: dict) -> None:
    """The best logit method / the best sequence-level KD, with a paired interval over the held-out
    prompts. Each is its best over the learning rates tried; at equal steps: a logit run of S steps is
    compared with the text-only runs of at most S steps (stopping early is the text alone's right), and
    only where a text-only run of S steps was made too."""
    from distill.evaluate.intervals import bootstrap

    runs = {}  # every scored model: each run's final one, and its checkpoints' (``name@step``)
    for name, r in section["methods"].items():
        runs[name] = r
        for step, bpb in r.get("checkpoints", {}).items():
            runs[f"{name}@{step}"] = {**r, "bits_per_byte": bpb, "steps": int(step)}
    value = lambda m: runs[m]["bits_per_byte"]["value"]  # noqa: E731
    steps = lambda m: runs[m].get("steps", 60)  # noqa: E731
    text = [m for m in runs if m.startswith("seqkd")]
    logit = [m for m in runs if not m.startswith("seqkd") and any(steps(t) == steps(m) for t in text)]
    if not text or not logit:
        return
    best = min(logit, key=value)
    base = min((t for t in text if steps(t) <= steps(best)), key=value)
    b, seq = runs[best]["bits_per_byte"], runs[base]["bits_per_byte"]
    cols = {"b:ce": np.array(b["per_prompt_nats"]), "s:ce": np.array(seq["per_prompt_nats"])}
    ci = bootstrap(lambda c: float(np.sum(c["b:ce"]) / np.sum(c["s:ce"])), cols)
    section["best_logit_method"], section["best_seqkd"] = best, base
    section["logit_vs_seqkd_bits_per_byte_ratio"] = round(b["value"] / seq["value"], 4)
    section["ratio_interval"] = [round(ci.low, 4), round(ci.high, 4)]
    section["tokens_aligned_share"] = runs[best]["alignment"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--topk", type=int, default=128)
    what = "share of each batch the student samples itself, graded by the teacher (uld, span)"
    ap.add_argument("--onpolicy", type=float, default=0.0, help=what)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the logit term (uld, span)")
    what = "the teacher's answers: sampled at temperature 1 (the headline), or greedy"
    ap.add_argument("--answers", choices=list(ANSWERS), default="sampled", help=what)
    ap.add_argument(
        "--append", action="store_true", help="add to crosstok.json, on the answers it was made with"
    )
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    what = "span: how chunks of several tokens are taught (train.cross_chunk)"
    ap.add_argument("--chunk", choices=["bernoulli", "ce"], default="bernoulli", help=what)
    what = "the teacher's signal from a cache (distill cache, timed apart) instead of live (uld, span)"
    ap.add_argument("--cache", action="store_true", help=what)
    what = "also score the checkpoints every N steps (each counts as a run of that many steps)"
    ap.add_argument("--score-every", type=int, default=0, help=what)
    args = ap.parse_args()
    from distill import pipeline
    from distill.core.hardware import cpu_model
    from distill.core.models import resolve_model_dir
    from distill.core.recipe import load_config
    from distill.teacher.crosstok import CROSS_ROWS

    methods = args.methods.split(",")
    common = [*base(args), *ANSWERS[args.answers], f"runs_dir={args.runs}"]
    if args.score_every:
        common += [f"train.checkpoint_every={args.score_every}", "train.keep_checkpoints=1000"]
    onpolicy = [f"train.onpolicy_fraction={args.onpolicy}"] if args.onpolicy else []
    cached = ["cache.use=true"] if args.cache else []
    logit = [f"train.alpha={args.alpha}", *onpolicy, *cached, f"train.cross_chunk={args.chunk}"]
    alpha = {m: [] if m == "seqkd" else logit for m in methods}
    settings = (args.alpha, args.topk, args.lr, args.steps, args.onpolicy)
    extra = {m: (args.cache, args.chunk) if m != "seqkd" else () for m in methods}
    named = {m: key(m, *settings, *extra[m]) for m in methods}
    names = {m: f"name={run_name(args.answers, m, *settings, *extra[m])}" for m in methods}
    cfgs = {m: load_config(None, [*common, *METHODS[m], *alpha[m], names[m]]) for m in methods}
    whole = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    fresh = {
        "methods": {},
        "answers": args.answers,
        "steps": args.steps,
        "lr": args.lr,
        "cross_topk": args.topk,
    }
    if args.answers == "sampled":
        kept = {k: v for k, v in whole.items() if k == "greedy"}
        out = {**fresh, **({k: v for k, v in whole.items() if k != "greedy"} if args.append else {}), **kept}
    else:
        out = whole.get("greedy", fresh) if args.append else fresh
    if args.append:  # the answers of the recorded runs: copied, not generated again
        first = load_config(None, [*common, f"name={run_name(args.answers, 'seqkd', 0.5)}"])
        generate_s = out.get("generate_seconds")
    else:
        first = cfgs[methods[0]]
        t0 = time.perf_counter()
        pipeline.generate(first)  # the teacher's answers once, for every method
        generate_s = time.perf_counter() - t0
    for m in methods:
        cfg = cfgs[m]
        if cfg.run_dir != first.run_dir:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("answers.jsonl", "split.json"):
                shutil.copy(first.run_dir / name, cfg.run_dir / name)
        pipeline.shrink(cfg)
        cache_s = None
        if cfg.cache.use:
            t0 = time.perf_counter()
            pipeline.build_teacher_cache(cfg)
            cache_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.train_student(cfg, resume=False)
        seconds = time.perf_counter() - t0
        summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
        bpb = bits_per_byte(cfg.run_dir / "student", cfg)
        checkpoints = {}
        for ckpt in sorted((cfg.run_dir / "checkpoints").glob("step-*")) if args.score_every else []:
            step = int(ckpt.name.removeprefix("step-"))
            if step < summary["steps"]:
                checkpoints[str(step)] = bits_per_byte(
                    cfg.run_dir / "student", cfg, weights=ckpt / "model.safetensors"
                )
                print(f"{m} at step {step}: bits per byte {checkpoints[str(step)]['value']:.4f}")
        shutil.rmtree(cfg.run_dir / "checkpoints", ignore_errors=True)  # 1.7 GB a run, only for resuming
        out["methods"][named[m]] = {
            "bits_per_byte": bpb, "train_seconds": round(seconds, 1), "steps": summary["steps"],
            **({"cache_seconds": round(cache_s, 1)} if cache_s is not None else {}),
            "alpha": cfg.train.alpha, "cross_topk": cfg.train.cross_topk, "lr": cfg.train.lr,
            "alignment": summary.get("cross_tokenizer_alignment"), "signal": summary["teacher_signal"],
            "onpolicy_fraction": cfg.train.onpolicy_fraction, "cross_chunk": cfg.train.cross_chunk,
            "onpolicy": summary.get("cross_tokenizer_onpolicy"),
            "cross_rows": CROSS_ROWS.get(cfg.train.cross_tokenizer),
            **({"checkpoints": checkpoints} if checkpoints else {}),
        }  # fmt: skip
        print(f"{m}: bits per byte {bpb['value']:.4f} [{bpb['low']:.4f}, {bpb['high']:.4f}], {seconds:.0f} s")
    if "untrained_student" not in out:
        out["untrained_student"] = {"bits_per_byte": bits_per_byte(first.run_dir / "student_init", first)}
    if "teacher" not in out:  # the teacher on its own answers, in its own tokens
        out["teacher"] = {"bits_per_byte": bits_per_byte(resolve_model_dir(first.teacher.model), first)}
    ratio(out)
    out["generate_seconds"] = round(generate_s, 1) if generate_s is not None else None
    out["cpu"] = cpu_model()
    out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    out["command"] = " ".join(["python", *sys.argv])
    out["commands"] = [*(out.get("commands", []) if args.append else []), out["command"]]  # every run in it
    out["date"] = dt.date.today().isoformat()
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()  # fmt: skip
    whole = out if args.answers == "sampled" else {**whole, "greedy": out}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(whole, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("methods", "greedy")}, indent=1))


if __name__ == "__main__":
    main()
