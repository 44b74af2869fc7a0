"""Export the trained student as a plain Hugging Face folder with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import RunConfig
from distill.evaluate import METRICS


def export_student(student_dir: Path, out_dir: Path, cfg: RunConfig, eval_results: dict | None) -> Path:
    """Write safetensors weights, config, tokenizer, generation config and README.md.

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` alone.
    """
    dtype = torch.bfloat16 if cfg.export.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(student_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    summary = student_dir.parent / "train_summary.json"
    steps = json.loads(summary.read_text())["steps"] if summary.is_file() else cfg.train.max_steps
    (tmp / "README.md").write_text(model_card(cfg, eval_results, model.config.num_hidden_layers, steps))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def model_card(cfg: RunConfig, eval_results: dict | None, num_layers: int, steps: int | None = None) -> str:
    """A Markdown model card: what was distilled from what, how, and how well."""
    t = cfg.train
    student = (
        f"{num_layers} decoder layers shrunk from the teacher "
        f"(layers {cfg.student.layers or f'evenly spaced, {cfg.student.num_layers}'})"
        if cfg.student.init == "shrink"
        else f"initialised from `{cfg.student.model}`"
    )
    teacher = (
        f"{cfg.teacher.api.model} (through an OpenAI-compatible API)"
        if cfg.teacher.kind == "openai"
        else cfg.teacher.model
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [distillation, distill]",
        "---",
        f"# {cfg.name}: a student distilled from `{teacher}`",
        "",
        "Made with [distill](https://github.com/distill). Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## Recipe",
        "",
        f"- Teacher: `{teacher}`",
        f"- Student: {student}",
        f"- Data: `{cfg.data.path or 'distill embedded default prompts'}`, "
        f"{cfg.data.heldout_size} prompts held out; teacher answers "
        f"({'sampled' if cfg.generate.do_sample else 'greedy'}, up to {cfg.generate.max_new_tokens} tokens)",
        f"- Loss: {t.alpha} x {t.loss} (distillation temperature {t.distill_temperature}) "
        f"+ {1 - t.alpha:g} x cross-entropy on the teacher's answer tokens",
        f"- Optimiser: AdamW, lr {t.lr}, {t.warmup_steps} warmup steps then cosine, "
        f"{steps or t.max_steps} steps x {t.batch_size} sequences x {t.grad_accum} accumulation, "
        f"precision {t.dtype}" + (f" (time budget {t.time_budget})" if t.time_budget else ""),
        "",
    ]
    if eval_results:
        models = [m for m in ("teacher", "untrained_student", "student") if m in eval_results]
        precision = eval_results.get("precision") or {}
        if precision:
            lines += [f"- Precision ({k}): {p['reason']}" for k, p in precision.items()] + [""]
        lines += ["## Evaluation (held-out prompts)", "", "| metric | " + " | ".join(models) + " |"]
        lines.append("|---|" + "---|" * len(models))
        for m in METRICS:
            lines.append(f"| {m} | " + " | ".join(_fmt(eval_results[k].get(m)) for k in models) + " |")
        lines += [
            "",
            "kl: mean per-token KL(teacher || model) on the teacher's answers; top1_agreement: share of "
            "those positions where the argmax tokens agree; perplexity: of the teacher's answers; "
            "exact_match / rouge_l: greedy answer vs the teacher's; tokens_per_s: greedy generation "
            "on this machine's CPU.",
            "",
            "<details><summary>raw eval.json</summary>",
            "",
            "```json",
            json.dumps(eval_results, indent=1),
            "```",
            "</details>",
        ]
    return "\n".join(lines) + "\n"
