"""Export the trained student: a Hugging Face folder, GGUF files, a model card, each checked
against the student that was evaluated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core import fsio, interrupt
from distill.core.answers import answer_key
from distill.core.config import RunConfig
from distill.core.data import Prompt, prompt_token_ids, student_answer_ids
from distill.core.terms import Terms, terms_of
from distill.evaluate.metrics import METRICS


def loss_line(t) -> str:
    """The model card's loss: the terms ``train.alpha`` weighs, a term of weight 0 left out."""
    kd = f"{t.loss} (distillation temperature {t.distill_temperature})"
    ce = "cross-entropy on the teacher's answer tokens"
    if t.alpha >= 1:
        return f"{kd} alone"
    if t.alpha <= 0:
        return f"{ce} alone"
    return f"{t.alpha:g} x {kd} + {1 - t.alpha:g} x {ce}"


def export_student(
    student_dir: Path,
    out_dir: Path,
    cfg: RunConfig,
    eval_results: dict | None,
    check_rows: list[tuple[list[int], list[int]]] | None = None,
    teacher_gguf: Path | None = None,
    terms: Terms | None = None,
) -> tuple[Path, dict | None]:
    """Write the student in the formats ``cfg.export.formats`` names, check them, then the card.

    - hf: safetensors weights, config, tokenizer, generation config; loads with
      ``transformers.AutoModelForCausalLM.from_pretrained`` alone (and vLLM).
    - gguf: one file per ``cfg.export.gguf_types`` (``<name>-f16.gguf``, ...), and an Ollama Modelfile.

    ``check_rows`` (prompt ids, teacher answer ids on held-out prompts): each written model is
    compared with the evaluated student (``check_export``); the result is returned and goes into
    the model card, with the run's ``terms`` of use (None: read from ``cfg``'s files). Everything
    is written into a temporary folder that replaces ``out_dir`` at the end, so a failed export
    leaves the previous one (or none), never half of one.
    """
    from distill.export.gguf import write_ggufs

    ex = cfg.export
    dtype = torch.bfloat16 if ex.dtype == "bfloat16" else torch.float32
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if "hf" in ex.formats:
            model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(student_dir)
            fsio.save_pretrained(model, tok, tmp)
            del model
        ggufs: dict[str, Path] = {}
        interrupt.check()  # safe points: the export is written in export.tmp/ and renamed at the end
        if "gguf" in ex.formats:
            paths = {kind: tmp / f"{cfg.name}-{kind}.gguf" for kind in ex.gguf_types}
            ggufs = write_ggufs(student_dir, paths, teacher_gguf=teacher_gguf, name=cfg.name)
            fsio.write_text(tmp / "Modelfile", ollama_modelfile(ggufs, student_dir))
        interrupt.check()
        check = check_export(student_dir, tmp if "hf" in ex.formats else None, ggufs, check_rows, cfg)
        summary = student_dir.parent / "train_summary.json"
        steps = json.loads(summary.read_text())["steps"] if summary.is_file() else cfg.train.max_steps
        n_layers = json.loads((student_dir / "config.json").read_text()).get("num_hidden_layers", 0)
        card = model_card(cfg, eval_results, n_layers, steps, check=check, ggufs=ggufs, terms=terms)
        fsio.write_text(tmp / "README.md", card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir, check


def ollama_modelfile(ggufs: dict[str, Path], student_dir: Path) -> str:
    """An Ollama Modelfile for the smallest file written, with the chat template spelled for Ollama
    where the student's is ChatML (the embedded default's)."""
    order = ["q4_0", "q8_0", "f16"]
    kind = next(k for k in order if k in ggufs)
    lines = [f"FROM ./{ggufs[kind].name}", "PARAMETER temperature 0"]
    tok_cfg = student_dir / "tokenizer_config.json"
    template = json.loads(tok_cfg.read_text()).get("chat_template") if tok_cfg.is_file() else None
    if not template and (student_dir / "chat_template.jinja").is_file():
        template = (student_dir / "chat_template.jinja").read_text()
    if template and "<|im_start|>" in template:
        lines += [
            'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
            '{{ .Response }}<|im_end|>\n"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"


def check_export(
    student_dir: Path,
    hf_dir: Path | None,
    ggufs: dict[str, Path],
    rows: list[tuple[list[int], list[int]]] | None,
    cfg: RunConfig,
) -> dict | None:
    """The exported models against the evaluated student on held-out prompts.

    - hf: the folder reloaded by stock transformers, and the fields vLLM reads (``serving_problems``);
    - gguf: each file in llama.cpp (when llama-cpp-python is installed): greedy continuations,
      teacher-forced log-probs and perplexity of the teacher's answers (``check_gguf``).
    """
    from distill.export.gguf import check_gguf, llama_cpp_available, reference

    if not rows:
        return None
    import numpy as np

    ex = cfg.export
    gguf_check = bool(ggufs) and llama_cpp_available()
    out: dict = {"prompts": len(rows)}
    if hf_dir is not None or gguf_check:  # the evaluated student's answers and log-probs, once
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        eos = student.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        ref = reference(student, rows, ex.check_new_tokens, eos)
        del student
    if hf_dir is not None:
        exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        got = reference(exported, rows, ex.check_new_tokens, eos)
        diffs = np.concatenate([np.abs(x - y) for x, y in zip(got["logprobs"], ref["logprobs"], strict=True)])
        same = [g == r for g, r in zip(got["greedy"], ref["greedy"], strict=True)]
        out["hf"] = {
            "greedy_match": sum(same) / len(same),
            "logprob_abs_diff_max": float(diffs.max()),
            "serving_problems": serving_problems(hf_dir),
        }
        del exported
    if gguf_check:
        out["gguf"] = check_gguf(ggufs, ref, rows, ex.check_new_tokens, eos)
    elif ggufs:
        out["gguf"] = {"skipped": "llama-cpp-python is not installed (make install-llama builds it)"}
    return out


def serving_problems(folder: Path) -> list[str]:
    """What a serving engine (vLLM, TGI) would miss in an exported folder; [] when nothing."""
    problems = []
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not config:
        problems.append("config.json is missing")
    for field in (
        "architectures",
        "model_type",
        "max_position_embeddings",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
    ):
        if config and field not in config:
            problems.append(f"config.json has no {field}")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config and heads and hidden and hidden % heads and "head_dim" not in config:
        problems.append("config.json: hidden_size is not a multiple of the heads and no head_dim is given")
    if not (folder / "generation_config.json").is_file():
        problems.append("generation_config.json is missing")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append("no tokenizer.json or tokenizer.model")
    if not (folder / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json is missing")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        problems.append("no .safetensors weights")
    elif len(shards) > 1 and not (folder / "model.safetensors.index.json").is_file():
        problems.append("several .safetensors files but no model.safetensors.index.json")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        problems.append("pickle weights (.bin/.pt) next to the safetensors")
    return problems


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def model_card(
    cfg: RunConfig,
    eval_results: dict | None,
    num_layers: int,
    steps: int | None = None,
    check: dict | None = None,
    ggufs: dict[str, Path] | None = None,
    terms: Terms | None = None,
) -> str:
    """A Markdown model card: what was distilled from what, how, how well, and on what terms
    (``terms``; None: read from ``cfg``'s files with ``distill.core.terms.terms_of``)."""
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
        "Made with distill. Loads with plain transformers:",
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
        f"- Loss: {loss_line(t)}",
        f"- Optimiser: AdamW, lr {t.lr}, {t.warmup_steps} warmup steps then cosine, "
        f"{steps or t.max_steps} steps x {t.batch_size} sequences x {t.grad_accum} accumulation, "
        f"precision {t.dtype}" + (f" (time budget {t.time_budget})" if t.time_budget else ""),
        "",
        "## Terms of use",
        "",
        *(f"- {label[0].upper()}{label[1:]}: {text}" for label, text in (terms or terms_of(cfg)).rows()),
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
    if ggufs:
        lines += ["", "## GGUF (llama.cpp, Ollama)", ""]
        lines += [f"- `{path.name}`" for path in ggufs.values()]
        first = next(iter(ggufs.values())).name
        lines += [
            "",
            "```sh",
            f"llama-server -m {first}     # OpenAI-compatible, chat template inside",
            "ollama create student -f Modelfile && ollama run student",
            "```",
        ]
    if check:
        lines += [
            "",
            "## Export check",
            "",
            f"Each exported model against the evaluated student on {check['prompts']} held-out prompts: "
            "greedy continuations the same token for token, |difference| of the teacher-forced "
            "log-probs of the teacher's answers, and their perplexity.",
            "",
            "| model | greedy same | mean abs log-prob diff | max | perplexity | vs f16 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        if "hf" in check:
            h = check["hf"]
            diff = f"{h['logprob_abs_diff_max']:.2g}"
            lines.append(f"| Hugging Face folder | {h['greedy_match']:.0%} | - | {diff} | - | - |")
        files = (check.get("gguf") or {}).get("files") or {}
        for r in files.values():
            lines.append(
                f"| {r['file']} (llama.cpp) | {r['greedy_match']:.0%} | {r['logprob_abs_diff_mean']:.2g} | "
                f"{r['logprob_abs_diff_max']:.2g} | {r['perplexity']:.3f} | "
                f"{r.get('perplexity_vs_f16', 1):.4f} |"
            )
        if (check.get("gguf") or {}).get("skipped"):
            lines += ["", f"GGUF not checked: {check['gguf']['skipped']}."]
        problems = (check.get("hf") or {}).get("serving_problems")
        if problems:
            lines += ["", "Serving problems: " + "; ".join(problems)]
    return "\n".join(lines) + "\n"


def check_rows(
    cfg: RunConfig, tok, held: list[Prompt], answers: dict[str, dict], own: bool
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, teacher answer ids) of the first held-out prompts, for the export check; a student
    with its own tokenizer (``own``: the teacher's ids would index other tokens) reads the answers'
    text in its own tokens (``tok``)."""
    rows = []
    for p in held:
        rec = answers.get(answer_key(p.id))
        if rec is None or not rec.get("token_ids"):
            continue
        ids = prompt_token_ids(
            tok, p, system_prompt=cfg.data.system_prompt, max_tokens=cfg.data.max_prompt_tokens
        )
        stop = rec.get("finish_reason") == "stop"
        answer = student_answer_ids(tok, rec["text"], stop) if own else rec["token_ids"]
        rows.append((list(ids), list(answer)[: cfg.train.max_seq_len]))
        if len(rows) == cfg.export.check_prompts:
            break
    return rows


def check_lines(check: dict | None) -> list[str]:
    if not check:
        return []
    lines = []
    if "hf" in check:
        h = check["hf"]
        lines.append(
            f"  check, Hugging Face folder: greedy same on {h['greedy_match']:.0%} of "
            f"{check['prompts']} held-out prompts, max |log-prob diff| {h['logprob_abs_diff_max']:.2g}"
            + (f"; serving problems: {'; '.join(h['serving_problems'])}" if h["serving_problems"] else "")
        )
    g = check.get("gguf") or {}
    for r in (g.get("files") or {}).values():
        lines.append(
            f"  check, {r['file']} in llama.cpp: greedy same {r['greedy_match']:.0%}, mean |log-prob diff| "
            f"{r['logprob_abs_diff_mean']:.2g}, perplexity {r['perplexity']:.3f} "
            f"({r.get('perplexity_vs_f16', 1):.4f}x f16)"
        )
    if g.get("skipped"):
        lines.append(f"  GGUF not checked: {g['skipped']}")
    return lines
