"""Teacher, untrained student and student scored on the held-out prompts: the figures of eval.json."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.core.config import RunConfig
from distill.core.data import Prompt, prompt_token_ids, student_answer_ids
from distill.core.hardware import DTYPES, resolve_device
from distill.core.models import load_tokenizer
from distill.core.progress import console
from distill.evaluate.intervals import quality_intervals
from distill.evaluate.metrics import compare_speed, evaluate_model, peak_memory
from distill.evaluate.report import environment

MODELS = ("teacher", "untrained_student", "student")


def score_heldout(cfg: RunConfig, teacher, tok, folders: dict[str, Path | None], held: list[Prompt],
                  answers: dict[str, dict], precision: dict, api_total: dict | None = None,
                  ) -> tuple[dict, dict, list[dict], list[dict]]:  # fmt: skip
    """The teacher (``teacher``, None for an API teacher with no local copy) and the students in
    ``folders`` (untrained_student, student; teacher: its weights folder) on the ``held`` prompts
    against the teacher's ``answers``, then speed, memory, tasks and intervals.

    Returns (results: eval.json, per-prompt rows by model, the models' answers, the task answers).
    ``precision`` (the choices of precision.json) and ``api_total`` (an API teacher's cost and
    tokens) go into the results as they are.
    """
    ids = {p.id: prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt,
                                  max_tokens=cfg.data.max_prompt_tokens) for p in held}  # fmt: skip
    student_device = resolve_device("auto")
    candidates = {name: (teacher if name == "teacher" else None, folders[name]) for name in MODELS}
    # a student with its own tokenizer reads prompts and the teacher's answers in its tokens; KL and
    # top-1 agreement pair ids, so they are left out for it (bits per byte compares across tokenizers);
    # the teacher judges its answers' text read again in the teacher's tokens
    s_tok = load_tokenizer(str(candidates["student"][1]))
    own = teacher is not None and s_tok.get_vocab() != tok.get_vocab()
    toks = {name: s_tok if own and name != "teacher" else tok for name in candidates}
    s_ids, s_answers = ids, answers
    if own:
        s_ids = {p.id: prompt_token_ids(s_tok, p, system_prompt=cfg.data.system_prompt,
                                        max_tokens=cfg.data.max_prompt_tokens) for p in held}  # fmt: skip

        def restated(rec: dict) -> dict:
            return {
                **rec,
                "token_ids": student_answer_ids(s_tok, rec["text"], rec.get("finish_reason") == "stop"),
            }

        s_answers = {k: restated(rec) for k, rec in answers.items()}
    results, outputs, models = {}, [], {}
    for name, (model, folder) in candidates.items():
        if model is None and folder is not None:  # a student (an API-only teacher has neither)
            model = (
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(student_device).eval()
            )
        mine = own and name != "teacher"
        res, outs = evaluate_model(
            name, model, None if mine else teacher, toks[name], held, s_ids if mine else ids,
            s_answers if mine else answers, cfg.evaluate, weights_dir=folder,
            max_seq_len=cfg.train.max_seq_len, reference_answers=name == "teacher",
            judge=(teacher, tok, ids) if mine else None,  # its answers judged in the teacher's tokens
        )  # fmt: skip
        results[name], outputs = res, outputs + outs
        if model is not None:
            models[name] = model
    console.print("[dim]measuring generation speed, the models in turn...[/dim]")
    speed_prompts = {name: [(s_ids if own and name != "teacher" else ids)[p.id] for p in held[:4]]
                     for name in candidates}  # fmt: skip
    speed_toks = {name: toks[name] for name in models}
    speeds = compare_speed(models, speed_toks, {n: speed_prompts[n] for n in models}, cfg.evaluate,
                           DTYPES[cfg.evaluate.speed_dtype])  # fmt: skip
    for name, figures in speeds.items():
        results[name].update(figures)
    per_prompt = {name: r.pop("per_prompt") for name, r in results.items()}
    task_results, task_answers = {}, []
    if cfg.evaluate.tasks:
        from distill.evaluate.tasks import evaluate_tasks

        task_results, task_answers = evaluate_tasks(models, {n: toks[n] for n in models}, cfg)
    for name, r in results.items():  # latency: its mean answer length at its batch-1 rate
        lengths = [row["answer_tokens"] for row in per_prompt[name]]
        r["mean_answer_tokens"] = sum(lengths) / len(lengths) if lengths else None
        rate = r.get("tokens_per_s_batch1")
        r["seconds_per_answer"] = r["mean_answer_tokens"] / rate if rate and lengths else None
    if cfg.evaluate.measure_memory and held:
        console.print("[dim]measuring peak memory, each model in a fresh process...[/dim]")
        for name in ("teacher", "student"):
            if name in models:
                folder = candidates[name][1]
                dtype = DTYPES[cfg.evaluate.speed_dtype]
                results[name].update(
                    peak_memory(folder, speed_prompts[name][0], cfg.evaluate.speed_new_tokens, dtype)
                )
    intervals = quality_intervals(per_prompt, draws=cfg.evaluate.bootstrap_draws)
    t, s, u = results["teacher"], results["student"], results["untrained_student"]
    local = teacher is not None
    results["summary"] = {
        "heldout_prompts": len(held),
        "speedup_batch1": s["tokens_per_s_batch1"] / t["tokens_per_s_batch1"] if local else None,
        "speedup_batched": s["tokens_per_s_batched"] / t["tokens_per_s_batched"] if local else None,
        "size_ratio": s["params"] / t["params"] if local else None,
        "kl_untrained_over_trained": u["kl"] / max(s["kl"], 1e-12) if local and s["kl"] is not None else None,
    }
    if api_total is not None:
        results["summary"]["teacher_cost_usd"] = api_total["cost_usd"]
        results["summary"]["teacher_tokens"] = api_total["prompt_tokens"] + api_total["completion_tokens"]
    results["summary"]["price_per_hour"] = cfg.evaluate.price_per_hour
    results["precision"] = precision
    results["intervals"] = intervals
    results["tasks"] = task_results
    results["environment"] = environment()
    return results, per_prompt, outputs, task_answers
